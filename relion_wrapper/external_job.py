"""Run cryo-drvae 2D classification as a RELION *External* job (RELION 3.1, 4.0, 5.0).

RELION starts this program from the project directory as::

    cryo-drvae-relion --o External/job012/ --in_parts Select/job011/particles.star \
        [--K 50 --iter 12 --particle_diameter 180 --gpu 0 ...] --j 4 [additional args]

It classifies the particles with :func:`cryo_drvae.pipeline.run`, writes the RELION-style
``run_itNNN_{data,model,optimiser}.star`` files, declares them in ``RELION_OUTPUT_NODES.star``
and reports the outcome with RELION's marker files (``RELION_JOB_EXIT_SUCCESS``, ``..._FAILURE``,
``..._ABORTED``). With ``--auto_select [--min_score S] [--min_fom F]`` it also selects the good classes
(:mod:`cryo_drvae.selection`) into the job folder and declares the selected ``particles.star``
(and ``class_averages.star``) as extra output nodes. See ``docs/relion.md`` and ``docs/selection.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cryo_drvae import __version__, star_io
from cryo_drvae.config import ClusterConfig, DataConfig, RunConfig, TrainConfig, gpu_ids, parse_gpu
from cryo_drvae.cs_io import CS_OUTPUT_SUFFIXES
from cryo_drvae.errors import AbortRequested, ConfigError, CryoDrvaeError, InputFileError
from cryo_drvae.relion_flags import FLAG_NAMES, sort_extra_arguments

logger = logging.getLogger("cryo_drvae.relion")

# ---- RELION's file names -------------------------------------------------------------------
EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
EXIT_MARKERS = (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED)

# Exit codes, as relion_refine --pipeline_control uses them (RELION itself ignores them).
RC_SUCCESS, RC_FAILURE, RC_ABORTED = 0, 1, 2

# ---- output nodes: (RELION 3.1 integer code, 4.0 label, 5.0 label) ---------------------------
NODE_TYPES: dict[str, tuple[int, str, str]] = {
    "data": (3, "ParticlesData.star.relion.class2d", "ParticleGroupMetadata.star.relion.class2d"),
    "model": (8, "ProcessData.star.relion.model", "ProcessData.star.relion.model"),
    "optimiser": (9, "ProcessData.star.relion.optimiser.class2d", "OptimiserData.star.relion.class2d"),
    "class_averages_star": (5, "ImagesData.star.relion", "Image2DGroupMetadata.star.relion"),
    # --auto_select: the Select job's outputs (cryo_drvae.selection)
    "selected_particles": (3, "ParticlesData.star.relion", "ParticleGroupMetadata.star.relion"),
    "selected_class_averages": (5, "ImagesData.star.relion.classaverages",
                                "Image2DGroupMetadata.star.relion.classaverages"),
}
DEFAULT_RELION_VERSION = 5   # labels used when no pipeline file tells the version

# Files the core pipeline writes for a prefix, plus the two the wrapper adds.
PIPELINE_SUFFIXES = ("_data.star", "_model.star", "_class_averages.mrcs", "_classes.png", "_convergence.png",
                     *CS_OUTPUT_SUFFIXES)   # the cryoSPARC files, for a .cs input or --cs_out
WRAPPER_SUFFIXES = ("_optimiser.star", "_class_averages.star")

_BARE = "\0bare"            # value argparse stores for a label given without a value
_TRUE = {"", "1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}

# Config fields the wrapper sets itself; all other DataConfig/TrainConfig/ClusterConfig fields
# can be passed as `--<field> <value>` (e.g. a RELION parameter pair "epochs_initial" / "2").
_WRAPPER_OWNED = {"particles_star"}
_ALIASES = FLAG_NAMES       # RELION's names (--K, --nr_classes, --iter, --offset_range, --angpix, ...)


class _ArgumentError(CryoDrvaeError):
    """The command line RELION built cannot be used."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:        # argparse would print usage and exit 2
        raise _ArgumentError(f"command line: {message}")


def _config_fields() -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for klass in (DataConfig, TrainConfig, ClusterConfig):
        for f in dataclasses.fields(klass):
            if f.name not in _WRAPPER_OWNED:
                fields[f.name] = f
    return fields


def build_parser() -> argparse.ArgumentParser:
    """The parser for the command line RELION's External job builds (see docs/relion.md)."""
    p = _Parser(prog="cryo-drvae-relion", allow_abbrev=False,
                description="cryo-drvae 2D classification as a RELION External job.")
    p.add_argument("--o", required=True, help="job folder, e.g. External/job012/ (from RELION)")
    p.add_argument("--in_parts", required=True, help="input particles STAR file (RELION 3.0 or 3.1+ format) or cryoSPARC .cs")
    p.add_argument("--j", default="1", help="threads (RELION's 'Number of threads')")
    p.add_argument("--gpu", nargs="?", const=_BARE, default=None,
                   help="GPU ids as in RELION ('0', '0,1': one process per GPU); empty = GPU 0; "
                        "an error without CUDA")
    p.add_argument(*_ALIASES["seed"], dest="seed", default=None, help="random seed (default 0)")
    p.add_argument("--continue", dest="continue_run", nargs="?", const=_BARE, default=None,
                   help="resume from the checkpoint in the job folder")
    p.add_argument("--relion_version", choices=("3", "4", "5"), default=None,
                   help="node-type labels to write; default: detected from the pipeline STAR files")
    p.add_argument("--pipeline_control", default=None, help=argparse.SUPPRESS)
    p.add_argument("--auto_select", nargs="?", const=_BARE, default=None,
                   help="also select the good classes (cryo-drvae select) into the job folder: particles.star, "
                        "class_averages.star, rank_model.star, rank_classes.png")
    p.add_argument("--min_score", default=None, help="--auto_select: keep classes scoring at least this (0-1)")
    p.add_argument("--min_fom", default=None,
                   help="--auto_select: drop particles of kept classes with rlnParticleFigureOfMerit below this "
                        "(default 0.01; 0 keeps whole classes)")
    group = p.add_argument_group("classification options (any DataConfig/TrainConfig/ClusterConfig field)")
    for name in _config_fields():
        flags = _ALIASES.get(name, (f"--{name}",))
        group.add_argument(*flags, dest=name, nargs="?", const=_BARE, default=None)
    return p


def _convert(option: str, raw: str, default: Any) -> Any:
    """Turn one command-line value into the type of the config field's default."""
    if isinstance(default, bool):
        text = "" if raw == _BARE else raw.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"--{option}: expected yes/no (1/0), got {raw!r}")
    if raw == _BARE:
        raise ConfigError(f"--{option} needs a value; fill in the parameter's value field in RELION")
    kind = type(default) if default is not None else str
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--{option}: expected {kind.__name__}, got {raw!r}") from None


def gpu_count(device: str) -> int:
    """Number of GPUs a device string names (``cuda:0,1`` -> 2; ``cpu`` -> 0)."""
    return len(gpu_ids(device))


def torchrun_command(argv: Sequence[str], n_processes: int) -> list[str]:
    """This job again under ``torchrun``: one process per GPU on this node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}",
            "-m", "relion_wrapper.external_job", *argv]



def output_prefix(job_dir: str, n_rounds: int) -> str:
    """``External/job012/run_it012``: RELION's Class2D naming, so Select finds the data file
    by renaming ``_model.star``/``_optimiser.star`` to ``_data.star``."""
    return os.path.join(os.path.normpath(job_dir), f"run_it{n_rounds:03d}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build the run configuration from the parsed RELION command line."""
    fields = _config_fields()
    options: dict[str, Any] = {}
    for name, f in fields.items():
        raw = getattr(args, name)
        if raw is not None:
            default = f.default if f.default is not dataclasses.MISSING else None
            options[name] = _convert(_ALIASES.get(name, (f"--{name}",))[0][2:], raw, default)
    try:
        threads = int(args.j)
    except ValueError:
        raise ConfigError(f"--j: expected a number of threads, got {args.j!r}") from None
    seed = _convert("seed", args.seed, 0) if args.seed is not None else 0
    continue_run = _convert("continue", args.continue_run, False) if args.continue_run is not None else False
    n_rounds = options.get("n_rounds", ClusterConfig().n_rounds)
    return RunConfig.from_options(
        particles_star=args.in_parts,
        output_prefix=output_prefix(args.o, n_rounds),
        threads=threads,
        device=parse_gpu("" if args.gpu == _BARE else args.gpu),   # no CUDA: the run fails, as classify's
        continue_run=continue_run,
        overwrite=True,       # RELION owns the job folder: rerunning a job replaces its outputs
        seed=seed,
        **options,
    )


# ---- RELION version and output nodes --------------------------------------------------------

def detect_relion_version_from_text(text: str) -> int | None:
    """3, 4 or 5 from the text of a RELION pipeline STAR file; None if it is not one.

    3.1 writes integer ``_rlnPipeLineProcessType``; 4.0 writes ``_rlnPipeLineProcessTypeLabel``
    with ``# version 30001``; 5.0 writes ``# version 50001`` and ``_rlnPipeLineNodeTypeLabelDepth``.
    """
    if "_rlnPipeLineNodeTypeLabelDepth" in text or re.search(r"#\s*version\s+5\d{4}", text):
        return 5
    if "_rlnPipeLineProcessTypeLabel" in text or "_rlnPipeLineNodeTypeLabel" in text:
        return 4
    if re.search(r"_rlnPipeLineProcessType\b", text):
        return 3
    return None


def detect_relion_version(job_dir: str | os.PathLike, project_dir: str | os.PathLike = ".") -> int | None:
    """Version of the RELION that started the job: from ``<job>/job_pipeline.star``, else
    ``<project>/default_pipeline.star``; None when neither tells."""
    for path in (Path(job_dir) / "job_pipeline.star", Path(project_dir) / "default_pipeline.star"):
        try:
            version = detect_relion_version_from_text(path.read_text(errors="replace"))
        except OSError:
            continue
        if version is not None:
            return version
    return None


def write_output_nodes(job_dir: str, nodes: Sequence[tuple[str, str]], version: int) -> Path:
    """Write ``RELION_OUTPUT_NODES.star`` with both type columns.

    ``nodes`` holds (path, kind) with kind a key of ``NODE_TYPES``. RELION 3.1 reads the integer
    ``_rlnPipeLineNodeType`` (and keeps the unknown label column); 4.0/5.0 read only
    ``_rlnPipeLineNodeTypeLabel``, whose strings differ between 4.0 and 5.0.
    """
    types = [NODE_TYPES[kind] for _, kind in nodes]
    table = pd.DataFrame({
        star_io.PIPELINE_NODE_NAME: [str(path) for path, _ in nodes],
        star_io.PIPELINE_NODE_TYPE: np.array([code for code, _, _ in types], dtype=np.int64),
        star_io.PIPELINE_NODE_TYPE_LABEL: [label4 if version == 4 else label5
                                           for _, label4, label5 in types],
    })
    final = Path(job_dir) / OUTPUT_NODES
    star_io.write_star_blocks(final, {"output_nodes": table})
    return final


def _image_info(data_star: Path) -> tuple[int, float] | None:
    """(box size px, pixel size Å) of the first optics group of a 3.1-format data STAR file."""
    try:
        optics = star_io.read_star_blocks(data_star)["optics"]
        return (int(optics[star_io.IMAGE_SIZE].iloc[0]),
                float(optics[star_io.IMAGE_PIXEL_SIZE].iloc[0]))
    except Exception:  # noqa: BLE001 - only used for a default diameter
        return None


def write_optimiser(prefix: str, cfg: RunConfig, n_iterations_done: int) -> Path:
    """Minimal ``<prefix>_optimiser.star``: what RELION 4/5 Subset selection reads from a Class2D run.

    ``rlnCurrentIteration`` is ``n_iterations_done``, the rounds the run reports (``RunResult.n_rounds``,
    fewer than ``--iter`` when it converged); ``rlnNumberOfIterations`` is ``--iter``."""
    diameter = cfg.data.particle_diameter
    if diameter <= 0:        # the diameter the classification used (DIAMETER_FRACTION x box)
        info = _image_info(Path(f"{prefix}_data.star"))
        diameter = round(cfg.diameter_angst(*info), 2) if info else 0.0
    use_ctf = int(cfg.data.use_ctf)
    general = {
        "rlnOutputRootName": os.path.dirname(prefix) + "/run",
        "rlnModelStarFile": f"{prefix}_model.star",
        "rlnExperimentalDataStarFile": f"{prefix}_data.star",
        "rlnCurrentIteration": int(n_iterations_done),
        "rlnNumberOfIterations": int(cfg.cluster.n_rounds),
        "rlnParticleDiameter": float(diameter),
        "rlnDoCorrectCtf": use_ctf,
        "rlnDoIgnoreCtfUntilFirstPeak": 0,
        "rlnCtfDataArePhaseFlipped": 0,
        "rlnDoOnlyFlipCtfPhases": 0,
        "rlnRefsAreCtfCorrected": use_ctf,
        "rlnRandomSeed": int(cfg.seed),
    }
    final = Path(f"{prefix}_optimiser.star")
    star_io.write_star_blocks(final, {"optimiser_general": general})
    return final


def write_class_averages_star(prefix: str) -> Path:
    """``<prefix>_class_averages.star``: one ``_rlnReferenceImage`` per class (Auto-picking references)."""
    import mrcfile
    stack = Path(f"{prefix}_class_averages.mrcs")
    with mrcfile.open(stack, header_only=True, permissive=True) as m:
        n_classes = int(m.header.nz)
    numbers = np.arange(1, n_classes + 1, dtype=np.int64)
    table = pd.DataFrame({star_io.REFERENCE_IMAGE: [f"{k:06d}@{stack.as_posix()}" for k in numbers],
                          star_io.CLASS_NUMBER: numbers})
    final = Path(f"{prefix}_class_averages.star")
    star_io.write_star_blocks(final, {"": table})
    return final


# ---- automatic selection ---------------------------------------------------------------------

def _selection_names() -> tuple[str, ...]:
    from cryo_drvae.selection import OUTPUT_NAMES
    return tuple(OUTPUT_NAMES.values())


def selection_from_args(args: argparse.Namespace, prefix: str, job_dir: str):
    """The SelectionConfig for ``--auto_select [--min_score S] [--min_fom F]``, or None without --auto_select."""
    from cryo_drvae.selection import SelectionConfig
    wanted = _convert("auto_select", args.auto_select, False) if args.auto_select is not None else False
    if not wanted:
        for name in ("min_score", "min_fom"):
            if getattr(args, name) is not None:
                logger.warning("--%s %s is ignored without --auto_select", name, getattr(args, name))
        return None
    min_score = _convert("min_score", args.min_score, 0.0) if args.min_score is not None else None
    min_fom = _convert("min_fom", args.min_fom, 0.0) if args.min_fom is not None else None
    return SelectionConfig(prefix, job_dir, min_score=min_score, min_fom=min_fom)


def auto_select(selection_cfg) -> list[tuple[str, str]]:
    """Run the selection; the output nodes it adds."""
    from cryo_drvae.selection import select_classes
    paths = select_classes(selection_cfg)
    return [(str(paths["particles"]), "selected_particles"),
            (str(paths["class_averages"]), "selected_class_averages")]


# ---- markers, logging, abort ----------------------------------------------------------------

def touch(job_dir: str, name: str) -> None:
    with open(os.path.join(job_dir, name), "w"):
        pass


def _remove(path: str | os.PathLike) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_outputs_since(prefix: str, job_dir: str, since: float) -> list[str]:
    """Delete final outputs this run wrote (mtime >= since), so an aborted or failed run leaves none."""
    removed = []
    paths = [f"{prefix}{suffix}" for suffix in PIPELINE_SUFFIXES + WRAPPER_SUFFIXES]
    for path in paths + [os.path.join(job_dir, name) for name in _selection_names()]:
        try:
            if os.path.getmtime(path) >= since - 1.0:
                os.remove(path)
                removed.append(path)
        except OSError:
            pass
    nodes = os.path.join(job_dir, OUTPUT_NODES)
    if os.path.exists(nodes):
        _remove(nodes)
        removed.append(nodes)
    return removed


class _AbortWatch:
    """``should_abort`` for the pipeline: RELION's abort file, or SIGTERM (scancel, time limit)."""

    def __init__(self, job_dir: str) -> None:
        self.abort_file = os.path.join(job_dir, ABORT_NOW)
        self.signalled = False

    def __call__(self) -> bool:
        return self.signalled or os.path.exists(self.abort_file)

    def on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True


class _MaxLevel(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _StdStream:
    """sys.stdout / sys.stderr looked up at each write (they may be replaced after set-up)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def configure_logging(verbose: bool = False) -> None:
    """Progress to stdout (RELION's run.out), warnings and errors to stderr (run.err)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cryo_drvae_relion", False):
            root.removeHandler(h)
    out = logging.StreamHandler(_StdStream("stdout"))
    out.addFilter(_MaxLevel(logging.WARNING))
    out.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    err = logging.StreamHandler(_StdStream("stderr"))
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    for h in (out, err):
        h._cryo_drvae_relion = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    package = logging.getLogger("cryo_drvae")     # undo a CLI set-up in the same process
    package.handlers.clear()
    package.propagate = True


def _job_dir_from_argv(argv: Sequence[str]) -> str | None:
    """``--o`` even when the rest of the command line does not parse (to place the marker)."""
    for i, token in enumerate(argv):
        if token == "--o" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            return argv[i + 1]
        if token.startswith("--o="):
            return token[4:]
    return None


def _load_pipeline_run() -> Callable[..., Any]:
    from cryo_drvae.pipeline import run
    return run


# ---- the job ------------------------------------------------------------------------------

def run_job(argv: Sequence[str] | None = None,
            pipeline_run: Callable[..., Any] | None = None) -> int:
    """Run one External job; return the exit code (0 success, 1 failure, 2 aborted).

    ``pipeline_run`` replaces :func:`cryo_drvae.pipeline.run` (tests).
    """
    from cryo_drvae.distributed import is_main_process   # torch: imported when a job runs

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return RC_SUCCESS
    job_dir = _job_dir_from_argv(argv)
    prefix: str | None = None
    started = time.time()
    watch: _AbortWatch | None = None
    previous_handler: Any = None
    try:
        if job_dir is None:
            raise _ArgumentError("command line: --o <job folder> is missing; RELION always passes it")
        if not os.path.isdir(job_dir):
            raise InputFileError(f"{job_dir}: job folder (--o) does not exist; RELION creates it before "
                                 f"starting the job, create it yourself when running by hand")
        if is_main_process():
            for name in EXIT_MARKERS + (OUTPUT_NODES,):     # stale results of an earlier run
                _remove(os.path.join(job_dir, name))

        args, unknown = build_parser().parse_known_args(argv)
        sort_extra_arguments(unknown).report(strict=False, command="cryo-drvae-relion")
        if not os.path.isfile(args.in_parts):
            raise InputFileError(f"{args.in_parts}: input particles STAR file (--in_parts) not found "
                                 f"(working folder {os.getcwd()}); run the job from the RELION project folder")
        cfg = config_from_args(args)
        prefix = cfg.output_prefix
        selection_cfg = selection_from_args(args, prefix, job_dir)     # bad values fail before the run
        version = int(args.relion_version) if args.relion_version else detect_relion_version(job_dir)
        logger.info("cryo-drvae %s RELION External job; command: %s", __version__, " ".join(argv))
        logger.info("RELION version for output node types: %s",
                    version if version else f"unknown (no pipeline STAR file); using {DEFAULT_RELION_VERSION}.0 labels")
        version = version or DEFAULT_RELION_VERSION
        logger.info("output prefix %s, device %s, %d thread(s)", prefix, cfg.device, cfg.threads)
        logger.info("configuration:\n%s", cfg.to_yaml().rstrip())

        watch = _AbortWatch(job_dir)
        try:
            previous_handler = signal.signal(signal.SIGTERM, watch.on_signal)
        except ValueError:          # not the main thread (tests)
            previous_handler = None
        if watch():
            raise AbortRequested(f"{watch.abort_file} exists: abort requested before the start")

        if gpu_count(cfg.device) > 1 and "WORLD_SIZE" not in os.environ and pipeline_run is None:
            command = torchrun_command(argv, gpu_count(cfg.device))
            logger.info("several GPUs: running %s", " ".join(command))
            os.execv(command[0], command)
        run = pipeline_run or _load_pipeline_run()
        result = run(cfg, should_abort=watch)
        if not is_main_process():
            return RC_SUCCESS

        paths = {k: str(v) for k, v in getattr(result, "paths", {}).items()}
        data_star = paths.get("data_star", f"{prefix}_data.star")
        model_star = paths.get("model_star", f"{prefix}_model.star")
        for path in (data_star, model_star):
            if not os.path.isfile(path):
                raise CryoDrvaeError(f"{path}: the classification finished but did not write this file")
        write_optimiser(prefix, cfg, result.n_rounds)
        class_star = write_class_averages_star(prefix)
        extra_nodes = auto_select(selection_cfg) if selection_cfg is not None else []
        write_output_nodes(job_dir, [(data_star, "data"), (model_star, "model"),
                                     (f"{prefix}_optimiser.star", "optimiser"),
                                     (str(class_star), "class_averages_star")] + extra_nodes, version)
        touch(job_dir, EXIT_SUCCESS)
        logger.info("done: %s, %s", data_star, model_star)
        return RC_SUCCESS
    except AbortRequested as exc:
        if prefix:
            _remove_outputs_since(prefix, job_dir, started)
        logger.error("aborted: %s", exc)
        if job_dir and os.path.isdir(job_dir):
            touch(job_dir, EXIT_ABORTED)
        return RC_ABORTED
    except Exception as exc:  # noqa: BLE001 - every failure must leave RELION's failure marker
        if not isinstance(exc, CryoDrvaeError):
            traceback.print_exc(file=sys.stderr)
        if prefix:
            _remove_outputs_since(prefix, job_dir, started)
        logger.error("%s", exc if isinstance(exc, CryoDrvaeError) else f"unexpected {type(exc).__name__}: {exc}")
        if job_dir and os.path.isdir(job_dir):
            touch(job_dir, EXIT_FAILURE)
        return RC_FAILURE
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        for handler in logging.getLogger().handlers:
            handler.flush()


def main(argv: Sequence[str] | None = None, pipeline_run: Callable[..., Any] | None = None) -> None:
    """Console script ``cryo-drvae-relion``."""
    configure_logging()
    sys.exit(run_job(argv, pipeline_run=pipeline_run))


if __name__ == "__main__":
    main()
