"""Pieces of the benchmark: simulated sets, measured runs, the true-template oracle, tables, pictures.

``run_bench.py`` strings them together; every piece is importable so that ``tests/test_bench.py``
can check scoring, the oracle and the tables on a tiny set without running RELION.

>>> sim = simulate_cached(SETS["easy"], Path("bench/work"))
>>> labels, _ = oracle_labels(sim, threads=2)
>>> row = score_row("easy", "oracle", sim.labels, labels, Measurement(1.0, 1.0, None), "abc1234")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mrcfile
import numpy as np
import pandas as pd
import torch
import yaml
from numpy.typing import NDArray
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from cryo_drvae.config import ClusterConfig
from cryo_drvae.ctf import params_from_particles
from cryo_drvae.evaluate import normalise_image_name, score_labels
from cryo_drvae.plots import plot_side_by_side
from cryo_drvae.fourier import fourier_crop, rfft_weights, shell_index, shell_sum
from cryo_drvae.preprocess import WorkingSet, choose_working_box, plan_preparation, prepare_working_set
from cryo_drvae import refine
from cryo_drvae.refine import EMState, Refiner
from cryo_drvae.simulate import SimulatedSet, SimulationConfig, simulate_dataset
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import pixel_sizes, read_particles

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
RELION_REFINE = "relion_refine"
RELION_TARGET_ITER = 25          # the iteration count every RELION row is reported for
SCALE_FIT_PARTICLES = 600        # particles used to fit the oracle's template amplitude
SEED = 1


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the log file to read."""


# --------------------------------------------------------------------------- the sets

@dataclass(frozen=True)
class BenchSet:
    """One simulated set and what runs on it.

    Attributes
    ----------
    relion_iter : int
        RELION iterations actually run; fewer than ``RELION_TARGET_ITER`` means the time is
        extrapolated to ``RELION_TARGET_ITER`` and the accuracy is the one after ``relion_iter``.
    ablations : tuple of str
        Also run cryo-drvae with these extra flags (keys of ``run_bench.ABLATIONS``).
    """

    name: str
    sim: SimulationConfig
    ablations: tuple[str, ...] = ()
    relion_iter: int = RELION_TARGET_ITER


def _sim(n_classes: int, n_particles: int, snr: float, **extra: object) -> SimulationConfig:
    return SimulationConfig(n_classes=n_classes, n_particles=n_particles, snr=snr, box_size=64,
                            pixel_size=3.0, seed=SEED, **extra)


STRUCTURES = REPO_ROOT.parent / "shared" / "data" / "structures"
PROTEINS = {"kpr": ("3KPR.cif.gz",), "hvr": ("1hvr.pdb",), "mix": ("3KPR.cif.gz", "1hvr.pdb")}
PROTEIN_SEEDS = (1, 2, 3)
BLOB_ABLATIONS = ("cryo-drvae --balance 0", "cryo-drvae --drvae")
PROTEIN_ABLATIONS = ("cryo-drvae --no_split_merge", "cryo-drvae --reference_filter ml",
                     "cryo-drvae --reference_filter wiener")


def _protein(name: str, snr: float, seed: int, n_particles: int = 2000, **extra: object) -> SimulationConfig:
    """A set projected from real atomic models (``../shared/data/structures``), 10 views, box 64;
    the pixel size makes the largest model span 65 % of the box, as after picking and extraction."""
    files = tuple(str(STRUCTURES / f) for f in PROTEINS[name])
    return SimulationConfig(n_classes=10, n_particles=n_particles, snr=snr, box_size=64, pixel_size=0.0,
                            pdb_files=files, seed=seed, **extra)


def structures_available() -> bool:
    """Whether every atomic model of ``PROTEINS`` is in ``../shared/data/structures``."""
    return all((STRUCTURES / f).exists() for files in PROTEINS.values() for f in files)


def _protein_sets() -> list[BenchSet]:
    """Each family at ``PROTEIN_SEEDS`` (simulated data and run seed both vary): mean and worst.
    None without the atomic models of ``../shared`` (the pixel size is read from them)."""
    if not structures_available():
        logger.warning("%s: atomic models not found; the real-protein sets are left out", STRUCTURES)
        return []
    families = {
        "kpr-0.05": dict(name="kpr", snr=0.05), "kpr-0.02": dict(name="kpr", snr=0.02),
        "kpr-0.01": dict(name="kpr", snr=0.01, n_particles=3000),
        "hvr-0.05": dict(name="hvr", snr=0.05), "hvr-0.02": dict(name="hvr", snr=0.02),
        "hvr-0.01": dict(name="hvr", snr=0.01, n_particles=3000),
        "kpr-imbalanced": dict(name="kpr", snr=0.02, imbalance=12.0),
        "mix-0.02": dict(name="mix", snr=0.02),
    }
    ablated = {"kpr-0.01", "kpr-imbalanced"}
    return [BenchSet(f"{family}-s{seed}", _protein(seed=seed, **spec),
                     ablations=PROTEIN_ABLATIONS if seed == PROTEIN_SEEDS[0] and family in ablated else ())
            for family, spec in families.items() for seed in PROTEIN_SEEDS]


SETS: dict[str, BenchSet] = {s.name: s for s in (
    BenchSet("easy", _sim(10, 2000, 0.05)),
    BenchSet("standard", _sim(10, 2000, 0.02), ablations=BLOB_ABLATIONS),
    BenchSet("hard", _sim(10, 3000, 0.01), ablations=BLOB_ABLATIONS),
    BenchSet("hetero", _sim(10, 2000, 0.02, n_shapes=2)),
    BenchSet("imbalanced", _sim(10, 2000, 0.02, imbalance=12.0)),
    BenchSet("large", _sim(20, 20000, 0.02), relion_iter=3),
    *_protein_sets(),
)}


def family_of(set_name: str) -> str:
    """``kpr-0.02-s2`` -> ``kpr-0.02``; blob sets are their own family."""
    head, _, tail = set_name.rpartition("-s")
    return head if head and tail.isdigit() else set_name


def parse_sets(text: str) -> list[BenchSet]:
    """``"easy,standard"``, ``"all"``, ``"proteins"`` or a family (``"kpr-0.02"``: its seeds) -> the sets."""
    if text.strip() == "all":
        names = list(SETS)
    elif text.strip() == "proteins":
        names = [n for n in SETS if family_of(n) != n]
    else:
        names = []
        for item in (n.strip() for n in text.split(",") if n.strip()):
            names += [n for n in SETS if family_of(n) == item and n != item] or [item]
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        raise ValueError(f"unknown set(s) {unknown or text!r}; choose from {', '.join(SETS)} or 'all'")
    return [SETS[n] for n in names]


# --------------------------------------------------------------------------- simulation cache

def config_key(cfg: SimulationConfig) -> str:
    """Short hash of every simulation parameter: same key, same particles."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def simulate_cached(bench_set: BenchSet, work_dir: Path) -> SimulatedSet:
    """Simulate ``bench_set`` under ``work_dir/sims``, or reuse the copy made with the same config.

    The set is written to a temporary folder and renamed when complete, so an interrupted
    simulation is never reused.
    """
    folder = Path(work_dir) / "sims" / f"{bench_set.name}-{config_key(bench_set.sim)}"
    if not (folder / "simulation.yaml").exists():
        tmp = folder.with_name(folder.name + ".partial")
        if tmp.exists():
            _remove_tree(tmp)
        logger.info("simulating %s into %s", bench_set.name, folder)
        simulate_dataset(bench_set.sim, tmp)
        os.replace(tmp, folder)
    truth = pd.read_csv(folder / "truth.csv")
    stacks = tuple(sorted((folder / "Particles").glob("*.mrcs")))
    return SimulatedSet(folder, folder / "particles.star", folder / "truth.csv", folder / "templates.mrcs",
                        stacks, truth["class"].to_numpy(np.int64), bench_set.sim)


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


# --------------------------------------------------------------------------- measured runs

@dataclass
class Measurement:
    """Wall and CPU seconds (user + system) and peak resident memory (MB; None if not measured)."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float | None
    note: str = ""


def run_measured(cmd: Sequence[str], cwd: Path, log_path: Path, threads: int) -> Measurement:
    """Run ``cmd`` to completion, output to ``log_path``; measure the child alone with ``wait4``.

    Raises
    ------
    BenchError
        If the command exits non-zero.
    """
    env = dict(os.environ)
    env["PATH"] = str(REPO_ROOT / ".venv" / "bin") + os.pathsep + env.get("PATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("running (log %s): %s", log_path, " ".join(map(str, cmd)))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"# cwd {cwd}\n# {' '.join(map(str, cmd))}\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchError(f"{cmd[0]} exited with status {proc.returncode} after {wall:.0f} s; see {log_path}")
    # Linux reports ru_maxrss in KiB
    return Measurement(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def cryo_drvae_command(sim: SimulatedSet, out_prefix: Path, threads: int,
                       extra: Sequence[str] = ()) -> list[str]:
    """The ``cryo-drvae classify`` call with default settings, the true K, ``--j`` and, as RELION
    gets it, the particle diameter."""
    return [str(REPO_ROOT / ".venv" / "bin" / "cryo-drvae"), "classify", "--i", str(sim.star_path.resolve()),
            "--o", str(out_prefix.resolve()), "--K", str(sim.config.n_classes), "--j", str(threads),
            "--particle_diameter", f"{sim.config.diameter:g}", "--seed", str(sim.config.seed), *extra]


def relion_command(sim: SimulatedSet, out_prefix: Path, threads: int, n_iter: int) -> list[str]:
    """RELION 3.1.3 2D classification as the benchmark specifies (run from the set's folder)."""
    return [RELION_REFINE, "--i", "particles.star", "--o", str(out_prefix.resolve()), "--ctf",
            "--iter", str(n_iter), "--tau2_fudge", "2", "--K", str(sim.config.n_classes),
            "--psi_step", "12", "--offset_range", "5", "--offset_step", "2", "--zero_mask",
            "--flatten_solvent", "--norm", "--scale", "--j", str(threads),
            "--particle_diameter", f"{sim.config.diameter:g}", "--pool", "30",
            "--dont_combine_weights_via_disc", "--random_seed", str(SEED)]


def relion_outputs(out_prefix: Path, n_iter: int) -> tuple[Path, Path]:
    """The last iteration's data STAR and class-average stack."""
    stem = f"{out_prefix}_it{n_iter:03d}"
    return Path(f"{stem}_data.star"), Path(f"{stem}_classes.mrcs")


def extrapolate_relion(measured: Measurement, out_prefix: Path, n_iter: int,
                       target_iter: int = RELION_TARGET_ITER) -> Measurement:
    """Time for ``target_iter`` iterations from a run of ``n_iter``: set-up + per-iteration x target.

    The per-iteration time comes from the write times of ``_it000`` and ``_itNNN`` model files;
    set-up is the rest of the measured wall time. CPU time is scaled by the same factor.
    """
    if n_iter >= target_iter:
        return measured
    first = Path(f"{out_prefix}_it000_model.star").stat().st_mtime
    last = Path(f"{out_prefix}_it{n_iter:03d}_model.star").stat().st_mtime
    per_iter = (last - first) / n_iter
    setup = max(0.0, measured.wall_s - per_iter * n_iter)
    wall = setup + per_iter * target_iter
    factor = wall / measured.wall_s
    note = (f"time extrapolated from {n_iter} to {target_iter} iterations "
            f"({measured.wall_s:.0f} s measured); accuracy after {n_iter}")
    return Measurement(wall, measured.cpu_s * factor, measured.peak_rss_mb, note)


# --------------------------------------------------------------------------- the oracle

def template_references(templates: NDArray, working_box: int) -> torch.Tensor:
    """True templates ``(K, B, B)`` -> references ``(K, W, W)`` at the working box (Fourier crop)."""
    spectrum = fourier_crop(torch.from_numpy(np.array(templates, np.float32)), working_box)
    return torch.fft.irfft2(spectrum, s=(working_box, working_box), norm="ortho")


def total_log_likelihood(refiner: Refiner, refs: torch.Tensor) -> float:
    """log p(data | refs) with a uniform class prior, poses marginalised."""
    k = refs.shape[0]
    uniform = np.full(k, -np.log(k))
    loglik, _, _ = refiner.expectation(refs, torch.from_numpy(uniform).float(), soft_statistics=False)
    return refine.total_log_likelihood(EMState(refs, uniform, loglik, None))


def fit_template_scale(refiner: Refiner, refs: torch.Tensor, start: float) -> float:
    """Amplitude ``a`` maximising the marginal likelihood of ``a * refs`` (log-scale search).

    A coarse scan in factors of 2 around ``start``, then a golden-section refinement between
    the best point's neighbours.
    """
    def score(log_a: float) -> float:
        return total_log_likelihood(refiner, float(np.exp(log_a)) * refs)

    grid = np.log(start) + np.log(2.0) * np.arange(-3, 4)
    values = [score(x) for x in grid]
    best = int(np.argmax(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = score(a), score(b)
    for _ in range(6):
        if fa > fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = score(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = score(b)
    candidates = [(values[best], grid[best]), (fa, a), (fb, b)]
    return float(np.exp(max(candidates)[1]))


def true_template_state(refiner: Refiner, templates_path: Path) -> EMState:
    """The true templates at the refiner's working box, solvent-masked, at the amplitude that fits
    the data best (what a perfect discovery would find); uniform class priors, no E-step yet."""
    with mrcfile.open(templates_path, permissive=True) as mrc:
        refs = template_references(np.array(mrc.data), refiner.ws.box_size) * refiner.solvent_mask
    refs = refs * fit_template_scale(refiner, refs, _moment_scale(refiner.ws, refs))
    k = refs.shape[0]
    return EMState(refs, np.full(k, -np.log(k)), None, None)


def class_prior_em(loglik: NDArray, n_iter: int = 200) -> NDArray:
    """Class proportions maximising the likelihood for fixed class log-likelihoods ``(n, K)``."""
    n, k = loglik.shape
    log_prior = np.full(k, -np.log(k))
    for _ in range(n_iter):
        joint = loglik + log_prior
        post = np.exp(joint - joint.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        log_prior = np.log(np.maximum(post.mean(0), 1e-12))
    return log_prior


def oracle_labels(sim: SimulatedSet, threads: int = 1) -> tuple[NDArray[np.int64], dict[str, float]]:
    """Classify ``sim`` with its TRUE templates: the engine's CTF-aware likelihood, poses marginalised.

    One global template amplitude is fitted by maximum likelihood on a subset, the class
    proportions by EM; each particle goes to its most probable class.

    Returns
    -------
    labels : ndarray, shape (n_particles,)
        1-based predicted classes in the row order of ``sim.star_path``.
    info : dict
        ``scale`` (fitted amplitude) and ``working_box``.
    """
    torch.set_num_threads(threads)
    rng = np.random.default_rng(SEED)
    table = read_particles(sim.star_path)
    stack = ParticleStack.from_table(table, data_dir=sim.star_path.parent)
    ctf = params_from_particles(table.per_particle(), str(table.path))
    pixel_size = float(pixel_sizes(table)[0])
    box = choose_working_box(stack.box_size, pixel_size, particle_diameter=sim.config.diameter)
    ws = prepare_working_set(stack, plan_preparation(stack, ctf, pixel_size, sim.config.diameter, box, SEED))
    stack.close()
    with mrcfile.open(sim.templates_path, permissive=True) as mrc:
        refs = template_references(mrc.data, box)
    k = refs.shape[0]
    cluster = ClusterConfig(n_classes=k)
    refiner = Refiner(ws, cluster, torch.device("cpu"))
    fit_refiner = refiner
    if len(ws) > SCALE_FIT_PARTICLES:
        subset = np.sort(rng.choice(len(ws), size=SCALE_FIT_PARTICLES, replace=False))
        fit_refiner = Refiner(ws.subset(subset), cluster, torch.device("cpu"))
    scale = fit_template_scale(fit_refiner, refs, _moment_scale(ws, refs))
    loglik, _, _ = refiner.expectation(scale * refs, torch.full((k,), -float(np.log(k))))
    labels = np.argmax(loglik + class_prior_em(loglik), axis=1) + 1
    return labels.astype(np.int64), {"scale": scale, "working_box": float(box)}


def _moment_scale(ws: WorkingSet, refs: torch.Tensor) -> float:
    """Starting amplitude: excess image energy over the noise / mean CTF-weighted template energy."""
    box = ws.box_size
    signal = float((ws.flipped.read(0, len(ws)) ** 2).sum(dim=(1, 2)).mean()) - ws.noise_var * box * box
    spectrum = torch.fft.rfft2(refs, norm="ortho").abs() ** 2
    shells = ws.ctf2_shells.shape[1]
    power = shell_sum(spectrum * torch.from_numpy(rfft_weights(box)), torch.from_numpy(shell_index(box)), shells)
    template = float((ws.ctf2_shells @ power.t()).mean())
    if signal <= 0 or template <= 0:
        return 1.0
    return float(np.sqrt(signal / template))


# --------------------------------------------------------------------------- scoring

@dataclass
class Row:
    """One line of the results table (``averages`` and ``class_order`` feed the picture only)."""

    set: str
    method: str
    accuracy: float
    nmi: float
    ari: float
    smallest_class: int
    largest_class: int
    wall_s: float | None
    cpu_s: float | None
    peak_rss_mb: float | None
    commit: str
    note: str = ""
    averages: str | None = None
    class_order: list[int] | None = field(default=None, repr=False)


def read_labels(data_star: Path, truth_csv: Path) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """True and predicted classes (1-based), matched by ``rlnImageName``.

    Raises
    ------
    BenchError
        If the data STAR file lacks particles of the truth table, or has no ``rlnClassNumber``.
    """
    particles = read_particles(data_star).particles
    if "rlnClassNumber" not in particles.columns:
        raise BenchError(f"{data_star}: no rlnClassNumber column; is it a classification's data STAR?")
    truth = pd.read_csv(truth_csv, comment="#")
    predicted = pd.Series(particles["rlnClassNumber"].to_numpy(np.int64),
                          index=particles["rlnImageName"].map(normalise_image_name).to_numpy())
    keys = truth["image_name"].map(normalise_image_name)
    missing = ~keys.isin(predicted.index)
    if missing.any():
        raise BenchError(f"{data_star}: {int(missing.sum())} particles of {truth_csv} are missing "
                         f"(first {truth['image_name'][missing].iloc[0]})")
    return truth["class"].to_numpy(np.int64), predicted.loc[keys].to_numpy(np.int64)


def match_classes(true: NDArray, pred: NDArray, n_classes: int) -> list[int]:
    """For each true class (1..K), the 0-based predicted class matched to it by the Hungarian
    assignment on the contingency table (-1 if none)."""
    n_pred = max(n_classes, int(np.max(pred)))
    table = np.zeros((n_classes, n_pred), dtype=np.int64)
    np.add.at(table, (np.asarray(true) - 1, np.asarray(pred) - 1), 1)
    rows, cols = linear_sum_assignment(-table)
    order = [-1] * n_classes
    for r, c in zip(rows, cols):
        order[int(r)] = int(c)
    return order


def score_row(set_name: str, method: str, true: NDArray, pred: NDArray, measurement: Measurement,
              commit: str, averages: Path | None = None) -> Row:
    """Score predicted against true labels (both 1-based) into a table row."""
    scores = score_labels(np.asarray(true), np.asarray(pred))
    n_classes = int(np.max(true))
    return Row(set_name, method, float(scores.accuracy), float(scores.nmi), float(scores.ari),
               int(scores.smallest_class), int(scores.largest_class), measurement.wall_s, measurement.cpu_s,
               measurement.peak_rss_mb, commit, measurement.note, str(averages) if averages else None,
               match_classes(true, pred, n_classes))


# --------------------------------------------------------------------------- results store

def load_results(path: Path) -> dict:
    """``{"rows": [...], "commands": [...]}`` from the results JSON (empty if absent)."""
    if not Path(path).exists():
        return {"rows": [], "commands": []}
    return json.loads(Path(path).read_text())


def merge_row(results: dict, row: Row) -> None:
    """Insert ``row``, replacing an earlier row of the same set and method."""
    results["rows"] = [r for r in results["rows"] if (r["set"], r["method"]) != (row.set, row.method)]
    results["rows"].append(dataclasses.asdict(row))


def save_results(results: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def record(path: Path, row: Row | None = None, command: str | None = None) -> dict:
    """Add ``row`` and/or ``command`` to the results JSON at ``path`` and return its content.

    The file is re-read under an exclusive lock, so several bench processes sharing one work
    folder never drop each other's rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        if row is not None:
            merge_row(results, row)
        if command is not None and command not in results["commands"]:
            results["commands"].append(command)
        save_results(results, path)
    return results


def rows_of(results: dict) -> list[Row]:
    """Stored rows in table order: sets as in ``SETS``, then methods as in ``METHOD_ORDER``."""
    rows = [Row(**r) for r in results["rows"]]
    set_rank = {name: i for i, name in enumerate(SETS)}
    method_rank = {name: i for i, name in enumerate(METHOD_ORDER)}
    return sorted(rows, key=lambda r: (set_rank.get(r.set, len(SETS)), r.set,
                                       method_rank.get(r.method, len(METHOD_ORDER)), r.method))


METHOD_ORDER = ("cryo-drvae", "cryo-drvae --no_split_merge", "cryo-drvae --reference_filter ml",
                "cryo-drvae --reference_filter wiener",
                "cryo-drvae --no_drvae", "cryo-drvae --drvae", "cryo-drvae --balance 0",
                "RELION 3.1.3", "oracle")
TABLE_COLUMNS = ("set", "method", "accuracy", "NMI", "ARI", "smallest/largest class", "wall s", "CPU s",
                 "peak RSS MB", "commit", "note")


# --------------------------------------------------------------------------- tables

def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_cells(row: Row) -> list[str]:
    return [row.set, row.method, f"{row.accuracy:.3f}", f"{row.nmi:.3f}", f"{row.ari:.3f}",
            f"{row.smallest_class}/{row.largest_class}", _number(row.wall_s, 0), _number(row.cpu_s, 0),
            _number(row.peak_rss_mb, 0), row.commit, row.note]


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a markdown table, one line per row, columns ``TABLE_COLUMNS``."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in table_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """Per set: cryo-drvae's accuracy gap to the oracle and its speed ratio against RELION."""
    by_set: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_set.setdefault(r.set, {})[r.method] = r
    lines = []
    for name, methods in by_set.items():
        ours = methods.get("cryo-drvae")
        if ours is None:
            continue
        parts = [f"{name}:"]
        oracle = methods.get("oracle")
        if oracle is not None:
            parts.append(f"accuracy gap to oracle {oracle.accuracy - ours.accuracy:+.3f} "
                         f"({ours.accuracy:.3f} vs {oracle.accuracy:.3f})")
        relion = methods.get("RELION 3.1.3")
        if relion is not None:
            parts.append(f"vs RELION accuracy {ours.accuracy - relion.accuracy:+.3f}")
            if relion.wall_s and ours.wall_s:
                parts.append(f"wall speed-up x{relion.wall_s / ours.wall_s:.1f}")
            if relion.cpu_s and ours.cpu_s:
                parts.append(f"CPU speed-up x{relion.cpu_s / ours.cpu_s:.1f}")
            if relion.note:
                parts.append("(RELION time extrapolated)")
        if len(parts) > 1:
            lines.append(" ".join(parts))
    return lines


def machine_line() -> str:
    """CPU model, cores, memory and date of this machine."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {mem_kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory = ""
    return (f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}, {dt.datetime.now().strftime('%Y-%m-%d %H:%M %Z').strip()}")


def family_lines(rows: Sequence[Row]) -> list[str]:
    """Per family of seeded sets and method: mean and worst accuracy over its seeds, as a table."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if family_of(r.set) != r.set:
            groups.setdefault((family_of(r.set), r.method), []).append(r)
    if not groups:
        return []
    lines = ["| family | method | seeds | mean accuracy | worst seed | mean wall s | mean CPU s |",
             "|---|---|---|---|---|---|---|"]
    for (family, method), members in groups.items():
        acc = [r.accuracy for r in members]
        walls = [r.wall_s for r in members if r.wall_s is not None]
        cpus = [r.cpu_s for r in members if r.cpu_s is not None]
        worst = min(members, key=lambda r: r.accuracy)
        lines.append(f"| {family} | {method} | {len(members)} | {np.mean(acc):.3f} | {worst.accuracy:.3f} "
                     f"({worst.set.rpartition('-')[2]}) | {_number(np.mean(walls) if walls else None, 0)} | "
                     f"{_number(np.mean(cpus) if cpus else None, 0)} |")
    return lines


def results_markdown(rows: Sequence[Row], machine: str, commands: Sequence[str]) -> str:
    """The whole ``results.md``: machine, commands, table, per-set summary."""
    text = ["# cryo-drvae vs RELION 3.1.3 vs oracle (simulated sets)", "",
            f"Machine: {machine}", "", "Commands:", ""]
    text += [f"    {c}" for c in commands]
    text += ["", "Sets (box 64 px, 3 Å/px, seed 1): " + "; ".join(
        f"{s.name} " + (f"{s.sim.n_shapes} shapes x " if s.sim.n_shapes > 1 else "")
        + f"{s.sim.views_per_shape} views / {s.sim.n_particles} particles / SNR {s.sim.snr:g}"
        + (f" / sizes 1:{s.sim.imbalance:g}" if s.sim.imbalance > 1 else "")
        for s in SETS.values()), "",
        "Accuracy: Hungarian-matched fraction correct. Wall/CPU/peak RSS of the whole process "
        "(CPU = user + system; oracle measured in-process, no RSS). `commit`: cryo-drvae code used.", "",
        "## Real-protein families: mean and worst seed", "", *family_lines(rows), "",
        markdown_table(rows), "", "## Per set", ""]
    text += [f"- {line}" for line in summary_lines(rows)]
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------- pictures

def read_stack(path: Path | str) -> NDArray[np.float32]:
    with mrcfile.open(path, permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
    return data[None] if data.ndim == 2 else data


def align_to(image: NDArray, target: NDArray, step_deg: float = 4.0) -> NDArray:
    """``image`` rotated and shifted onto ``target`` (best cross-correlation inside a disc)."""
    box = target.shape[-1]
    y, x = np.mgrid[:box, :box] - box // 2
    disc = (np.hypot(x, y) < box * 0.45).astype(np.float32)
    t = (target - target[disc > 0].mean()) * disc
    t_hat = np.conj(np.fft.rfft2(t))
    best = (-np.inf, image)
    for angle in np.arange(0.0, 360.0, step_deg):
        rotated = ndimage.rotate(image, angle, reshape=False, order=1, mode="nearest")
        r = (rotated - rotated[disc > 0].mean()) * disc
        corr = np.fft.irfft2(np.fft.rfft2(r) * t_hat, s=(box, box))
        shift = np.unravel_index(int(np.argmax(corr)), corr.shape)
        if corr[shift] > best[0]:
            best = (float(corr[shift]), np.roll(rotated, (-shift[0], -shift[1]), axis=(0, 1)))
    return best[1]


def ordered_averages(row: Row, templates: NDArray) -> NDArray | None:
    """The row's class averages in true-class order, each aligned to its template (blank if unmatched)."""
    if not row.averages or not Path(row.averages).exists() or row.class_order is None:
        return None
    averages = read_stack(row.averages)
    box = templates.shape[-1]
    out = np.zeros_like(templates)
    for t, c in enumerate(row.class_order):
        if 0 <= c < len(averages) and averages[c].shape[-1] == box:
            out[t] = align_to(averages[c], templates[t])
    return out


def plot_results(rows: Sequence[Row], templates: dict[str, NDArray], path: Path) -> Path:
    """Per set: true templates, RELION's class averages and cryo-drvae's, side by side.

    Averages are put in true-class order (Hungarian matching) and aligned to their template.
    """
    panels: dict[str, NDArray] = {}
    short = {"RELION 3.1.3": "RELION", "cryo-drvae": "cryo-drvae"}
    for set_name, tpl in templates.items():
        found = {}
        for method, label in short.items():
            row = next((r for r in rows if r.set == set_name and r.method == method), None)
            images = ordered_averages(row, tpl) if row else None
            if images is not None:
                found[f"{set_name}\n{label} {row.accuracy:.2f}"] = images
        if found:
            panels[f"{set_name}\ntruth"] = tpl
            panels.update(found)
    if not panels:
        raise ValueError("no class averages to show yet")
    return plot_side_by_side(panels, path, "true templates | RELION | cryo-drvae (matched, aligned)")


def git_commit() -> str:
    """Short commit of the repository; ``+<hash>`` of the local changes under ``cryo_drvae/`` if any."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              check=True).stdout

    try:
        commit = git("log", "-1", "--format=%h").strip()
        changes = git("diff", "HEAD", "--", "cryo_drvae")
        for name in sorted(git("ls-files", "--others", "--exclude-standard", "--", "cryo_drvae").split()):
            changes += name + (REPO_ROOT / name).read_text(errors="replace")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not changes:
        return commit
    return f"{commit}+{hashlib.sha1(changes.encode()).hexdigest()[:6]}"
