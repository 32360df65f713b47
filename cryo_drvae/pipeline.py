"""The classification job: particles STAR (or cryoSPARC .cs) in, Class2D-style outputs out.

``classify`` calls the stages of the data path in order: read the particles (STAR or .cs), open
their stack, read the CTF, prepare the working set, train the DRVAE (``--drvae``), find the first
classes, run the refinement rounds, compute the full-size averages and each particle's fit to its
average (``screening.py``), average again over the members that fit, write the outputs.
Run set-up is in ``runtime.py``; the round state is checkpointed (``checkpoint.py``) after the
first classes and after every round, so ``--continue`` resumes an interrupted job.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from . import __version__, checks, checkpoint, plots
from .alignment import to_relion_pose
from .averaging import average_sums, finish_averages
from .checkpoint import RoundState
from .config import RunConfig
from .cs_io import read_any, write_cs_outputs
from .ctf import CtfParams, params_from_particles
from .distributed import Comm, init_comm, shutdown
from .errors import AbortRequested, ConfigError, InputFileError
from .guard import claim_prefix
from .io_utils import atomic_path, staged_outputs
from .outputs import ClassificationResult, write_run_outputs
from .preprocess import Preparation, WorkingSet, choose_working_box, plan_preparation, prepare_working_set
from .refine import Assignment, Refiner, floored_log_prior, posterior
from .runtime import StageTimer, loader_workers, remove_scratch, scratch_folder, set_up
from .screening import DEFAULT_MIN_FOM, figure_of_merit, measure_fit
from .splitting import grow_classes
from .stack import ParticleStack
from .star_io import ParticleTable, pixel_sizes
from .train import Denoiser, TrainingPairs, pseudo_target_training

logger = logging.getLogger(__name__)
#: A class whose fitting members are fewer than this is averaged over all its members.
MIN_FITTING_MEMBERS = 3


@dataclass
class RunResult:
    """Paths of everything written, the final classification and per-stage wall times (s)."""

    paths: dict[str, Path]
    result: ClassificationResult
    timings: dict[str, float] = field(default_factory=dict)
    n_rounds: int = 0              # refinement rounds actually run (fewer than --iter when converged)


def run(cfg: RunConfig, should_abort: Callable[[], bool] | None = None) -> RunResult:
    """Classify the particles of ``cfg.data.particles_star`` and write all outputs.

    Under ``torchrun`` every rank calls this; they share the work and rank 0 writes.
    """
    comm = init_comm(cfg.device.startswith("cuda"))
    try:
        with claim_prefix(cfg, comm.is_main):
            return classify(cfg, comm, should_abort or (lambda: False))
    finally:
        shutdown(comm)


def classify(cfg: RunConfig, comm: Comm, abort: Callable[[], bool]) -> RunResult:
    """The stages of the data path, top to bottom (every rank; rank 0 writes)."""
    timer = StageTimer()
    device = set_up(cfg, comm)
    logger.info("cryo-drvae %s: %s", __version__, " ".join(sys.argv))
    if comm.active:
        logger.info("rank %d of %d on %s", comm.rank, comm.world_size, device)
    scratch = scratch_folder(cfg, comm)
    ws: WorkingSet | None = None
    try:
        with timer("read"):
            table = read_particles(cfg)
            fingerprint = checkpoint.input_fingerprint(table.path, len(table))
            state = checkpoint.load_round_state(cfg, fingerprint) if cfg.continue_run else None   # refuse early
            stack = read_stack(table, cfg)
            ctf = read_ctf(table, cfg)
            pixel_size = single_pixel_size(table)
            plan, ws = prepare(stack, ctf, pixel_size, cfg, comm, scratch, abort)
        refiner = Refiner(ws, cfg.cluster, device, comm, n_total=stack.n_particles)
        denoiser = make_denoiser(ws, cfg, device, comm, state)
        if state is None:
            init_ws = initial_working_set(stack, plan, ws, cfg, comm, abort)
            with timer("train"):
                initial_training(denoiser, ws, cfg, abort)
            with timer("cluster"):
                state = initial_classes(init_ws, denoiser, cfg, device, comm, abort)
            state.assignment = spread_labels(state.assignment, init_ws.particles, stack.n_particles)
            checkpoint.save_round_state(cfg, state, comm, fingerprint)
        state = refinement_rounds(refiner, ws, state, denoiser, cfg, timer, abort, fingerprint)
        with timer("average"):
            result = final_result(stack, ctf, pixel_size, ws, refiner, state, abort)
    finally:
        if ws is not None:
            ws.close()
        remove_scratch(scratch)
    paths: dict[str, Path] = {}
    if comm.is_main:
        with timer("write"):
            paths = write_everything(cfg, table, result)
    stack.close()
    logger.info("stage times (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in timer.times.items()))
    return RunResult(paths, result, timer.times, n_rounds=state.round)


def read_particles(cfg: RunConfig) -> ParticleTable:
    """The particle table of ``--i``, a STAR or cryoSPARC .cs file."""
    table = read_any(cfg.data.particles_star, cfg.data.data_dir, pixel_size=cfg.data.pixel_size or None)
    check_class_count(table, cfg)
    return table


def check_class_count(table: ParticleTable, cfg: RunConfig) -> None:
    if cfg.cluster.n_classes > len(table):
        raise ConfigError(f"{table.path}: --K {cfg.cluster.n_classes} is larger than the number of "
                          f"particles ({len(table)}); choose --K <= {len(table)}")


def read_stack(table: ParticleTable, cfg: RunConfig) -> ParticleStack:
    """The images of the table's rows (rows that repeat an image are warned about first)."""
    checks.warn_duplicate_rows(table)
    return ParticleStack.from_table(table, data_dir=cfg.data.data_dir)


def read_ctf(table: ParticleTable, cfg: RunConfig) -> CtfParams | None:
    """Per-particle CTF parameters (None with ``--no_ctf``)."""
    return params_from_particles(table.per_particle(), str(table.path)) if cfg.data.use_ctf else None


def single_pixel_size(table: ParticleTable) -> float:
    sizes = pixel_sizes(table)
    if not np.allclose(sizes, sizes[0], rtol=1e-3):
        raise InputFileError(f"{table.path}: optics groups have different pixel sizes "
                             f"({sizes.min():.3f}-{sizes.max():.3f} Å); classify them separately or "
                             f"re-extract at one pixel size")
    return float(sizes[0])


def plan_working_set(stack: ParticleStack, ctf: CtfParams | None, pixel_size: float, cfg: RunConfig) -> Preparation:
    """Normalise the stack and plan the working box and whitening."""
    diameter = cfg.diameter_angst(stack.box_size, pixel_size)
    checks.check_particle_diameter(diameter, stack.box_size, pixel_size)
    stack.normalise(checks.background_radius_px(diameter, stack.box_size, pixel_size))
    box = choose_working_box(stack.box_size, pixel_size, cfg.data.working_box, diameter)
    return plan_preparation(stack, ctf, pixel_size, diameter, box, cfg.seed)


def prepare(stack: ParticleStack, ctf: CtfParams | None, pixel_size: float, cfg: RunConfig, comm: Comm,
            scratch: Path | None, abort: Callable[[], bool]) -> tuple[Preparation, WorkingSet]:
    """Normalise the stack, plan the working box, and prepare this rank's share of the particles."""
    plan = plan_working_set(stack, ctf, pixel_size, cfg)
    mine = np.arange(stack.n_particles)[comm.shard(stack.n_particles)]
    return plan, prepare_working_set(stack, plan, mine, scratch, loader_workers(cfg, len(mine)),
                                     should_abort=abort)


def initial_working_set(stack: ParticleStack, plan: Preparation, ws: WorkingSet, cfg: RunConfig,
                        comm: Comm, abort: Callable[[], bool]) -> WorkingSet:
    """The seeded random subset the first classes are found on, in RAM (the same on every rank)."""
    n = stack.n_particles
    size = cfg.cluster.initial_subset_size(n)
    if size == n:
        chosen = np.arange(n)
    else:
        chosen = np.sort(np.random.default_rng(cfg.seed + 1).choice(n, size=size, replace=False))
        logger.info("finding the first classes on %d of %d particles", size, n)
    if len(ws) < n:          # a rank of several holds only its shard: read the subset again
        return prepare_working_set(stack, plan, chosen, None, loader_workers(cfg, size), should_abort=abort)
    return ws if size == n and ws.flipped.tensor is not None else ws.subset(chosen)


def make_denoiser(ws: WorkingSet, cfg: RunConfig, device: torch.device, comm: Comm,
                  state: RoundState | None) -> Denoiser | None:
    """The DRVAE (``--drvae``), restored from the checkpoint when continuing."""
    if not cfg.train.use_drvae:
        return None
    denoiser = Denoiser(ws.box_size, cfg.train, device, cfg.seed, comm, loader_workers(cfg, len(ws)))
    if state is not None and state.denoiser is not None:
        denoiser.load_state_dict(state.denoiser)
    return denoiser


def initial_training(denoiser: Denoiser | None, ws: WorkingSet, cfg: RunConfig,
                     abort: Callable[[], bool]) -> None:
    """Step 1: train the DRVAE unsupervised on the phase-flipped particles."""
    if denoiser is None:
        return
    loss = denoiser.train(TrainingPairs(ws.flipped), cfg.train.epochs_initial, abort)
    logger.info("DRVAE trained %d epochs, loss %.4f", cfg.train.epochs_initial, loss)


def initial_classes(init_ws: WorkingSet, denoiser: Denoiser | None, cfg: RunConfig, device: torch.device,
                    comm: Comm, abort: Callable[[], bool]) -> RoundState:
    """Step 2: first class references, found on a subset of the particles.

    With the DRVAE: BSK-means++ of the denoised particles under alignment (the paper's step 2).
    Without: classes grown from one by splitting, with coarse-to-fine EM (robust at low SNR).
    Every rank computes the same; rank 0's result is broadcast so they agree bit for bit.
    """
    k = cfg.cluster.n_classes
    if denoiser is not None:
        refiner = Refiner(init_ws, cfg.cluster, device)
        assignment = refiner.cluster_denoised(denoiser.denoise(init_ws.flipped),
                                              np.random.default_rng(cfg.seed))
        references = refiner.references(refiner.statistics_from_labels(assignment.labels, assignment.pose))
        log_prior, labels = np.full(k, -np.log(k)), assignment.labels
    else:
        # on the rounds' angular step: a coarser one lets a large view gain likelihood by splitting
        # into copies turned by half a step (measured: docs/method.md)
        grown = grow_classes(Refiner(init_ws, cfg.cluster, device), k, split_merge=cfg.cluster.split_merge,
                             should_abort=abort)
        # class growing lets a prior reach 0 (an empty class), whose -inf cost the balanced assignment cannot use
        references = grown.refs
        log_prior = floored_log_prior(np.exp(grown.log_prior), max(cfg.cluster.balance, 1e-3) / k)
        labels = posterior(grown.loglik, grown.log_prior).argmax(1)
    references = comm.broadcast(references.contiguous())
    log_prior = comm.broadcast(torch.from_numpy(np.asarray(log_prior, np.float64))).numpy()
    sizes = np.bincount(labels, minlength=k)
    logger.info("initial classes: sizes %d-%d of %d particles", sizes.min(), sizes.max(), len(labels))
    history = [{"round": 0, "class_size_min": int(sizes.min()),
                "class_size_max": int(sizes.max())}]
    start = Assignment(labels, np.zeros_like(labels), np.zeros(len(labels)), np.zeros(len(labels)))
    return RoundState(0, start, references, log_prior, history,
                      denoiser.state_dict() if denoiser else None)


def spread_labels(start: Assignment, rows: NDArray, n_total: int) -> Assignment:
    """The first classes' labels of the subset ``rows`` (table rows) on all ``n_total`` particles,
    -1 for particles the first classes were not found on."""
    labels = np.full(n_total, -1, dtype=np.int64)
    labels[np.asarray(rows, np.int64)] = start.labels
    return Assignment(labels, np.zeros(n_total, np.int64), np.zeros(n_total), np.zeros(n_total))


def refinement_rounds(refiner: Refiner, ws: WorkingSet, state: RoundState, denoiser: Denoiser | None,
                      cfg: RunConfig, timer: StageTimer, abort: Callable[[], bool],
                      fingerprint: dict | None = None) -> RoundState:
    """Steps 3-4: BSK-means++ rounds in the likelihood metric (+ pseudo-target DRVAE training)."""
    while state.round < cfg.cluster.n_rounds:
        started = time.perf_counter()
        with timer("align"):
            assignment, step = refiner.bsk_step(state.references, state.log_prior)
        changed = changed_fraction(state.assignment.labels, assignment.labels)
        entry = {"round": state.round + 1, "changed_fraction": changed,
                 "mean_cost": float(np.mean(assignment.cost))}
        if denoiser is not None:
            with timer("train"):
                entry["drvae_loss"] = pseudo_target_training(refiner, ws, assignment, step.refs, denoiser,
                                                             cfg, abort)
        sizes = np.bincount(assignment.labels, minlength=cfg.cluster.n_classes)
        entry.update(class_size_min=int(sizes.min()), class_size_max=int(sizes.max()))
        state = RoundState(state.round + 1, assignment, step.refs, step.log_prior, state.history + [entry],
                           denoiser.state_dict() if denoiser else None)
        checkpoint.save_round_state(cfg, state, refiner.comm, fingerprint)
        took = time.perf_counter() - started
        logger.info("round %d/%d: %.1f%% of labels changed, class sizes %d-%d, %.1f s "
                    "(%.0f particles/s; at most %.0f s left)", state.round, cfg.cluster.n_rounds,
                    100 * changed, sizes.min(), sizes.max(), took, refiner.n_total / took,
                    took * (cfg.cluster.n_rounds - state.round))
        if abort():
            raise AbortRequested("abort requested after a round")
        if changed < cfg.cluster.tolerance:
            logger.info("converged: fewer than %.2f%% of labels changed", 100 * cfg.cluster.tolerance)
            break
    return state


def changed_fraction(before: NDArray, after: NDArray) -> float:
    """Share of particles whose label changed, among those that had one (-1 = none yet);
    all of them when none had one."""
    if len(before) != len(after):
        return 1.0
    known = before >= 0
    return float(np.mean(before[known] != after[known])) if known.any() else 1.0


def final_result(stack: ParticleStack, ctf: CtfParams | None, pixel_size: float, ws: WorkingSet, refiner: Refiner,
                 state: RoundState, abort: Callable[[], bool]) -> ClassificationResult:
    """Full-size averages from the final poses, each particle's fit to its average (``screening``),
    then the averages of the members that fit (the poor fits' sums taken out), converted to RELION's
    conventions."""
    assignment = state.assignment
    k = refiner.cfg.n_classes
    psi, shift_working = refiner.grid.decode(assignment.pose)
    shift = shift_working * ws.scale
    noise_var = ws.noise_var * ws.scale ** 2

    sums = average_sums(stack, ctf, pixel_size, assignment.labels, psi, shift, k, particles=ws.particles,
                        reduce=refiner.comm.sum, should_abort=abort)
    counts = np.bincount(assignment.labels, minlength=k)
    averages, _ = finish_averages(sums, counts, noise_var, pixel_size)
    fit = measure_fit(stack, ctf, pixel_size, assignment.labels, psi, shift, averages, noise_var,
                      radius_px=ws.particle_radius * ws.scale, particles=ws.particles, reduce=refiner.comm.sum)
    fom = figure_of_merit(fit, assignment.labels, k)
    # the poor fits' sums are re-read and taken out: a few rows, not a second pass over all of them
    poor = np.setdiff1d(ws.particles, fitting_members(assignment.labels, fom, ws.particles, k, refiner.comm.sum))
    poor_sums = average_sums(stack, ctf, pixel_size, assignment.labels, psi, shift, k, particles=poor,
                             reduce=refiner.comm.sum, should_abort=abort)
    averages, resolution = finish_averages((sums[0] - poor_sums[0], sums[1] - poor_sums[1]), counts, noise_var,
                                           pixel_size)
    relion_psi, relion_origin = to_relion_pose(psi, shift)
    return ClassificationResult(labels=assignment.labels, psi_deg=relion_psi, origin_px=relion_origin,
                                confidence=np.clip(assignment.confidence, 0.0, 1.0),
                                class_averages=averages, class_resolution=resolution,
                                pixel_size=pixel_size, history=state.history,
                                particle_diameter_px=2 * (ws.particle_radius - 1) * ws.scale,   # less the 1-px margin
                                figure_of_merit=fom)


def fitting_members(labels: NDArray, fom: NDArray, rows: NDArray, n_classes: int,
                    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts) -> NDArray:
    """The ``rows`` whose figure of merit reaches ``screening.DEFAULT_MIN_FOM``, plus every row of a
    class that would keep fewer than ``MIN_FITTING_MEMBERS`` over all ranks (so no average goes blank)."""
    fits = fom[rows] >= DEFAULT_MIN_FOM
    fitting_counts = reduce(torch.from_numpy(np.bincount(labels[rows][fits], minlength=n_classes))).numpy()
    thin = fitting_counts[labels[rows]] < MIN_FITTING_MEMBERS
    return rows[fits | thin]


def write_everything(cfg: RunConfig, table: ParticleTable, result: ClassificationResult) -> dict[str, Path]:
    """Pictures and config first, then cryoSPARC outputs (a .cs input or --cs_out), then the RELION
    outputs (data STAR last of all); all or nothing: they are renamed into place together once
    every one is written."""
    with staged_outputs():
        paths = _write_all(cfg, table, result)
    checkpoint.checkpoint_path(cfg).unlink(missing_ok=True)
    return paths


def _write_all(cfg: RunConfig, table: ParticleTable, result: ClassificationResult) -> dict[str, Path]:
    prefix = cfg.output_prefix
    counts = np.bincount(result.labels, minlength=result.class_averages.shape[0])
    paths = {"classes_png": plots.plot_class_gallery(result.class_averages, counts, f"{prefix}_classes.png",
                                                     result.class_resolution, result.pixel_size),
             "convergence_png": plots.plot_convergence(result.history, f"{prefix}_convergence.png")}
    config_path = Path(f"{prefix}_config.yaml")
    with atomic_path(config_path) as tmp:
        tmp.write_text(f"# cryo-drvae {__version__}\n# {' '.join(sys.argv)}\n" + cfg.to_yaml())
    paths["config"] = config_path
    paths.update(write_cs_outputs(prefix, table, result, seed=cfg.seed, force=cfg.data.cs_out))
    paths.update(write_run_outputs(prefix, table, result))
    return paths
