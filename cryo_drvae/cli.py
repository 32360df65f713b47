"""Command line: ``cryo-drvae classify | simulate | select | evaluate`` (RELION-style flags).

Each command builds a config, configures logging (stderr + a log file) and calls one library
function; a ``CryoDrvaeError`` becomes one clean error line and exit status 1.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .config import DIAMETER_FRACTION, RunConfig, parse_gpu
from .errors import CryoDrvaeError
from .relion_flags import FLAG_NAMES, sort_extra_arguments
from .signals import Terminated, terminate_as_interrupt

logger = logging.getLogger("cryo_drvae")


def setup_logging(log_file: Path | None = None, verbose: bool = False, append: bool = False) -> None:
    """Info to stderr (and to ``log_file``, started afresh unless ``append``); library modules
    only create loggers."""
    root = logging.getLogger("cryo_drvae")
    for old in root.handlers:
        old.close()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a" if append else "w"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.propagate = False


def _to_log_file(message: str) -> None:
    """Also put an error that ends the run into the run's log file (stderr gets it from click)."""
    for handler in logging.getLogger("cryo_drvae").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logging.makeLogRecord({"name": "cryo_drvae", "levelno": logging.ERROR,
                                                  "levelname": "ERROR", "msg": message}))


def clean_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one ``Error: ...`` line and exit status 1 (also in the log file);
    SIGINT/SIGTERM into one line and status 130/143."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CryoDrvaeError as exc:
            _to_log_file(str(exc))
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt as exc:
            message = interrupted_message(exc, kwargs.get("output_prefix"))
            _to_log_file(message)
            click.echo(f"Error: {message}", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)
    return wrapper


def interrupted_message(exc: KeyboardInterrupt, prefix: str | None) -> str:
    what = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT (Ctrl-C)"
    if prefix is None:
        return f"interrupted by {what}"
    checkpoint = Path(f"{prefix}_checkpoint.pt")
    if checkpoint.exists():
        return (f"interrupted by {what}; scratch files removed, {checkpoint} keeps the last finished "
                f"round: rerun the same command with --continue to resume")
    return f"interrupted by {what} before the first round finished; scratch files removed: rerun the command"


@click.group()
@click.version_option(__version__)
def main() -> None:
    """cryo-drvae: unsupervised 2D classification of cryo-EM particles (DRVAE + BSK-means++)."""


_DEFAULTS = RunConfig()


def _flags(field: str) -> tuple[str, ...]:
    """Our name and RELION's for a config field (one table for classify and the wrapper)."""
    return FLAG_NAMES.get(field, (f"--{field}",))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "max_content_width": 110})
@click.option("--i", "particles_star", required=True, type=click.Path(dir_okay=False),
              help="Input particles: RELION STAR file (3.0, or 3.1/4/5 with optics groups) or cryoSPARC particle .cs.")
@click.option("--o", "output_prefix", required=True,
              help="Output prefix, e.g. Class2D/job010/run: writes <o>_data.star, <o>_model.star, ...")
@click.option(*_flags("n_classes"), "n_classes", type=int, default=_DEFAULTS.cluster.n_classes, show_default=True,
              help="Number of classes.")
@click.option("--j", "threads", type=int, default=_DEFAULTS.threads, show_default=True, help="CPU threads.")
@click.option("--particle_diameter", type=float, default=_DEFAULTS.data.particle_diameter, show_default=True,
              help=f"Particle diameter in Å (mask and noise estimate); 0 = {DIAMETER_FRACTION:.0%} of the box.")
@click.option(*_flags("n_rounds"), "n_rounds", type=int, default=_DEFAULTS.cluster.n_rounds, show_default=True,
              help="Maximum number of refinement rounds (fewer when converged, see --tolerance).")
@click.option("--tolerance", type=float, default=_DEFAULTS.cluster.tolerance, show_default=True,
              help="Stop when fewer than this fraction of labels change in a round (0.01 = 1 %).")
@click.option(*_flags("seed"), "seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Random seed (same seed, same result on the CPU).")
@click.option("--gpu", default=None, is_flag=False, flag_value="",
              help='Run on CUDA: "0" or RELION-style "0,1" (empty = GPU 0). [default: CPU]')
@click.option("--continue", "continue_run", is_flag=True, help="Resume from <o>_checkpoint.pt after an interruption.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run on this --o.")
@click.option("--balance", type=float, default=_DEFAULTS.cluster.balance, show_default=True,
              help="BSK-means++ balance: every class >= balance x N / K particles (0 = plain K-means++).")
@click.option("--drvae/--no_drvae", "use_drvae", default=_DEFAULTS.train.use_drvae, show_default=True,
              help="Start from DRVAE-denoised BSK-means++ (the paper's step 2) instead of class growing.")
@click.option("--no_ctf", is_flag=True, help="Ignore CTF parameters (e.g. CTF-free or phase-flipped data). "
                                             "[default: CTF-aware]")
@click.option(*_flags("pixel_size"), "pixel_size", type=float, default=_DEFAULTS.data.pixel_size,
              show_default=True, help="Pixel size in Å/px for STAR files without one (0 = from the STAR file).")
@click.option(*_flags("max_shift_px"), "max_shift_px", type=float, default=_DEFAULTS.cluster.max_shift_px,
              show_default=True, help="Shift search range in px of the input images (0 = 10% of the box).")
@click.option("--psi_step", type=float, default=_DEFAULTS.cluster.psi_step, show_default=True,
              help="In-plane angular step in degrees.")
@click.option("--data_dir", default=None,
              help="Folder the image paths are relative to: RELION or cryoSPARC project. [default: working dir]")
@click.option("--cs_out", is_flag=True, default=None,
              help="Also write cryoSPARC outputs (<o>_particles.cs, <o>_templates.cs); always for a .cs input.")
@click.option("--working_box", type=int, default=_DEFAULTS.data.working_box, show_default=True,
              help="Working box in px after Fourier cropping (0 = automatic: Nyquist near 12 Å, 32-64 px).")
@click.option("--preread_images", is_flag=True, default=_DEFAULTS.data.preread_images,
              help="Keep the working images in RAM (faster when they fit) instead of streaming them.")
@click.option("--scratch_dir", default=None,
              help="Folder for the streamed working images. [default: <o>_scratch/ beside the outputs]")
@click.option("--reference_filter", type=click.Choice(["ml", "ml_common", "wiener"]), default=_DEFAULTS.cluster.reference_filter,
              show_default=True, help="Class references during classification: maximum likelihood or Wiener-filtered.")
@click.option("--split_merge/--no_split_merge", "split_merge", default=_DEFAULTS.cluster.split_merge,
              show_default=True, help="Split-and-merge moves at K, each kept only if the likelihood rises.")
@click.option("--move_criterion", type=click.Choice(["likelihood", "evidence"]),
              default=_DEFAULTS.cluster.move_criterion, show_default=True,
              help="What keeps a split-and-merge move: the likelihood, or the evidence (class references "
                   "integrated out; better when view sizes differ a lot, worse at SNR 0.01: docs/method.md).")
@click.option("--search_margin", type=float, default=_DEFAULTS.cluster.search_margin, show_default=True,
              help="Coarse-to-fine class search: a particle is scored exactly against the classes within this "
                   "many nats of its best on the low frequencies (0 = against every class).")
@click.option("--init_particles", type=int, default=_DEFAULTS.cluster.init_particles, show_default=True,
              help="Particles the first classes are found on (0 = max(5000, 100 x K)).")
@click.option("--epochs", "epochs_initial", type=int, default=_DEFAULTS.train.epochs_initial, show_default=True,
              help="Initial DRVAE epochs (with --drvae).")
@click.option("--dont_check_norm", is_flag=True,
              help="Accepted from RELION command lines; nothing to do (images are whitened here, "
                   "not required to be normalised).")
@click.option("--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
@clean_errors
def classify(ctx: click.Context, verbose: bool, gpu: str | None, no_ctf: bool, dont_check_norm: bool,
             **options: Any) -> None:
    """Classify particles: writes <o>_data.star, _model.star, _class_averages.mrcs and PNGs.

    RELION Class2D flags are accepted where they mean something here (--K/--nr_classes, --iter,
    --particle_diameter, --psi_step, --offset_range, --angpix, --random_seed, --dont_check_norm,
    --j, --gpu, --preread_images, --scratch_dir); other relion_refine flags (--ctf, --tau2_fudge,
    --pool, --zero_mask, ...) are ignored with a warning; anything else is an error.
    """
    from .distributed import is_main_process
    from .guard import claim_prefix
    from .pipeline import run

    extra = sort_extra_arguments(ctx.args)
    extra.refuse_unknown()               # a typo fails before anything is written
    setup_logging(None, verbose)          # until the prefix is ours, log to stderr only
    cfg = RunConfig.from_options(device=parse_gpu(gpu), use_ctf=not no_ctf,
                                 **options)
    main_rank = is_main_process()
    from tqdm.contrib.logging import logging_redirect_tqdm
    with claim_prefix(cfg, main_rank), terminate_as_interrupt():
        setup_logging(Path(f"{cfg.output_prefix}_run.log") if main_rank else None, verbose,
                      append=cfg.continue_run)
        extra.report(strict=True)            # the ignored RELION flags, into the log too
        with logging_redirect_tqdm([logging.getLogger("cryo_drvae")]):   # log lines above the bars
            result = run(cfg)
    for name, path in result.paths.items():
        click.echo(f"{name}: {path}")


@main.command()
@click.option("--o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--K", "n_classes", type=int, default=10, show_default=True, help="Number of classes.")
@click.option("--n", "n_particles", type=int, default=2000, show_default=True, help="Number of particles.")
@click.option("--snr", type=float, default=0.02, show_default=True, help="Signal-to-noise ratio.")
@click.option("--box", "box_size", type=int, default=64, show_default=True, help="Box size in px.")
@click.option("--angpix", "pixel_size", type=float, default=3.0, show_default=True,
              help="Pixel size in Å (0 with --pdb: the largest model spans 65% of the box).")
@click.option("--pdb", "pdb_files", default=None,
              help="Atomic model(s), PDB or mmCIF, comma-separated: one shape each instead of random blobs.")
@click.option("--jitter", "view_jitter_deg", type=float, default=None,
              help="Degrees (sd) each particle tilts off its view (default 2 with --pdb, 0 for blobs).")
@click.option("--shapes", "n_shapes", type=int, default=1, show_default=True, help="Distinct 3D shapes.")
@click.option("--imbalance", type=float, default=1.0, show_default=True,
              help="Largest / smallest class size.")
@click.option("--relion30", is_flag=True, help="Write a RELION 3.0-format STAR file.")
@click.option("--junk", "junk_fraction", type=float, default=0.0, show_default=True,
              help="Share of picks that are junk (empty ice, discs, carbon edges, aggregates, broken).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--project_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="RELION project folder: image paths in particles.star are written relative to it, "
                   "as RELION does (run RELION and classify from there).")
@clean_errors
def simulate(out_dir: str, project_dir: str, **options: Any) -> None:
    """Simulate particles with known classes: particles.star, Particles/*.mrcs, truth.csv."""
    from .simulate import SimulationConfig, simulate_dataset

    setup_logging()
    pdb_files = options.pop("pdb_files")
    options["pdb_files"] = tuple(p for p in (pdb_files or "").split(",") if p)
    result = simulate_dataset(SimulationConfig(**options), out_dir, project_dir=project_dir)
    click.echo(f"particles: {result.star_path}\ntruth: {result.truth_path}")


@main.command(name="select")
@click.option("--i", "input", required=True,
              help="Classification: prefix (Class2D/job010/run), its _model.star, or its job folder.")
@click.option("--o", "output_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder, e.g. Select/job012/.")
@click.option("--min_score", type=float, default=None,
              help="Keep classes with rlnClassScore >= this (default 0.9; none when --classes is given).")
@click.option("--min_resolution", type=float, default=None, help="Keep classes resolved to this (Å) or better.")
@click.option("--classes", default=None, help="Keep these class numbers, e.g. 1,4,7.")
@click.option("--min_fom", type=float, default=None,
              help="Drop particles of kept classes whose rlnParticleFigureOfMerit (fit to the class "
                   "average) is below this (default 0.01; 0 keeps whole classes).")
@clean_errors
def select_command(input: str, output_dir: str, min_score: float | None, min_resolution: float | None,
                   classes: str | None, min_fom: float | None) -> None:
    """Select good classes: particles.star, class_averages.star, rank_model.star, rank_classes.png."""
    from .selection import SelectionConfig, parse_classes, select_classes

    setup_logging()
    paths = select_classes(SelectionConfig(input, output_dir, min_score, min_resolution, parse_classes(classes),
                                           min_fom))
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


@main.command()
@click.option("--truth", "truth_csv", required=True, type=click.Path(dir_okay=False), help="truth.csv")
@click.option("--data", "data_star", required=True, type=click.Path(dir_okay=False), help="<o>_data.star")
@clean_errors
def evaluate(truth_csv: str, data_star: str) -> None:
    """Score a classification against the truth: accuracy (Hungarian), NMI, ARI."""
    from .evaluate import evaluate_run, format_scores

    click.echo(format_scores(evaluate_run(truth_csv, data_star)))


if __name__ == "__main__":
    main()
