"""The classification job: particles STAR in, Class2D-style outputs out.

``run`` reads top to bottom: read, prepare, train the DRVAE, BSK-means++ under alignment,
rounds of CTF-aware refinement with pseudo-target DRVAE training, full-size averages, write.
A checkpoint after every round lets ``continue_run`` resume an interrupted job.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__, plots
from .alignment import to_relion_pose, transform_images
from .averaging import class_averages
from .clustering import reliable_mask
from .config import RunConfig
from .ctf import params_from_particles
from .errors import AbortRequested, ConfigError, InputFileError
from .io_utils import atomic_path
from .outputs import ClassificationResult, check_outputs_writable, write_run_outputs
from .preprocess import WorkingSet, choose_working_box, prepare_working_set
from .refine import Assignment, Refiner, posterior
from .splitting import grow_classes
from .stack import ParticleStack
from .star_io import ParticleTable, pixel_sizes, read_particles
from .train import Denoiser

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Paths of everything written, the final classification and per-stage wall times (s)."""

    paths: dict[str, Path]
    result: ClassificationResult
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundState:
    """What a checkpoint holds between rounds."""

    round: int
    assignment: Assignment
    references: torch.Tensor
    log_prior: np.ndarray
    history: list[dict]
    denoiser: dict | None


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return the generator that code passes along."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--gpu was given but CUDA is not available (torch {torch.__version__}); "
                          f"run without --gpu on this machine")
    return torch.device(name)


class StageTimer:
    """Accumulates wall time per named stage."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, stage: str) -> "_Stage":
        return _Stage(self, stage)


class _Stage:
    def __init__(self, timer: StageTimer, stage: str):
        self.timer, self.stage = timer, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.timer.times[self.stage] = self.timer.times.get(self.stage, 0.0) + elapsed


def run(cfg: RunConfig, should_abort: Callable[[], bool] | None = None) -> RunResult:
    """Classify the particles of ``cfg.data.particles_star`` and write all outputs."""
    abort = should_abort or (lambda: False)
    timer = StageTimer()
    check_outputs_writable(cfg.output_prefix)
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)   # tiny posteriors as denormals slow CPU matmuls many-fold
    device = resolve_device(cfg.device)
    rng = seed_everything(cfg.seed)
    logger.info("cryo-drvae %s: %s", __version__, " ".join(sys.argv))
    with timer("read"):
        table = read_particles(cfg.data.particles_star)
        check_class_count(table, cfg)
        stack = ParticleStack.from_table(table, data_dir=cfg.data.data_dir)
        ctf = params_from_particles(table.per_particle(), str(table.path)) if cfg.data.use_ctf else None
        pixel_size = single_pixel_size(table)
        diameter = cfg.data.particle_diameter or 0.6 * stack.box_size * pixel_size
        box = choose_working_box(stack.box_size, pixel_size, cfg.data.working_box)
        ws = prepare_working_set(stack, ctf, pixel_size, diameter, box, rng, should_abort=abort)
    refiner = Refiner(ws, cfg.cluster, device)
    state = load_checkpoint(cfg) if cfg.continue_run else None
    if state is None:
        with timer("train"):
            denoiser = initial_denoiser(ws, cfg, device, abort)
        with timer("cluster"):
            state = initial_classes(refiner, ws, denoiser, cfg, device, rng, abort)
        save_checkpoint(cfg, state)
    else:
        denoiser = restore_denoiser(state, ws, cfg, device)
    state = refinement_rounds(refiner, ws, state, denoiser, cfg, timer, abort)
    with timer("average"):
        result = final_result(stack, ctf, pixel_size, ws, refiner, state, abort)
    with timer("write"):
        paths = write_everything(cfg, table, result)
    stack.close()
    logger.info("stage times (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in timer.times.items()))
    return RunResult(paths, result, timer.times)


def check_class_count(table: ParticleTable, cfg: RunConfig) -> None:
    if cfg.cluster.n_classes > len(table):
        raise ConfigError(f"{table.path}: --K {cfg.cluster.n_classes} is larger than the number of "
                          f"particles ({len(table)}); choose --K <= {len(table)}")


def single_pixel_size(table: ParticleTable) -> float:
    sizes = pixel_sizes(table)
    if not np.allclose(sizes, sizes[0], rtol=1e-3):
        raise InputFileError(f"{table.path}: optics groups have different pixel sizes "
                             f"({sizes.min():.3f}-{sizes.max():.3f} Å); classify them separately or "
                             f"re-extract at one pixel size")
    return float(sizes[0])


def initial_denoiser(ws: WorkingSet, cfg: RunConfig, device: torch.device,
                     abort: Callable[[], bool]) -> Denoiser | None:
    """Step 1: train the DRVAE unsupervised on the phase-flipped particles."""
    if not cfg.train.use_drvae:
        return None
    denoiser = Denoiser(ws.box_size, cfg.train, device, cfg.seed)
    loss = denoiser.train(ws.flipped, ws.flipped, cfg.train.epochs_initial, abort)
    logger.info("DRVAE trained %d epochs, loss %.4f", cfg.train.epochs_initial, loss)
    return denoiser


def initial_classes(refiner: Refiner, ws: WorkingSet, denoiser: Denoiser | None, cfg: RunConfig,
                    device: torch.device, rng: np.random.Generator, abort: Callable[[], bool]) -> RoundState:
    """Step 2: first classes and references.

    With the DRVAE: BSK-means++ of the denoised particles under alignment (the paper's step 2).
    Without: classes grown from one by splitting, with coarse-to-fine EM (robust at low SNR).
    """
    k = cfg.cluster.n_classes
    if denoiser is not None:
        assignment = refiner.cluster_denoised(denoiser.denoise(ws.flipped), rng)
        stats = refiner.statistics_from_labels(assignment.labels, assignment.pose)
        references, log_prior = refiner.references(stats), np.full(k, -np.log(k))
        labels = assignment.labels
    else:
        coarse = Refiner(ws, dataclasses.replace(cfg.cluster, psi_step=max(20.0, cfg.cluster.psi_step)), device)
        grown = grow_classes(coarse, k, should_abort=abort)
        references, log_prior = grown.refs, grown.log_prior
        labels = posterior(grown.loglik, grown.log_prior).argmax(1)
    sizes = np.bincount(labels, minlength=k)
    logger.info("initial classes: sizes %d-%d", sizes.min(), sizes.max())
    history = [{"round": 0, "changed_fraction": 1.0, "class_size_min": int(sizes.min()),
                "class_size_max": int(sizes.max())}]
    start = Assignment(labels, np.zeros_like(labels), np.zeros(len(labels)), np.ones(len(labels)))
    return RoundState(0, start, references, log_prior, history,
                      denoiser.state_dict() if denoiser else None)


def refinement_rounds(refiner: Refiner, ws: WorkingSet, state: RoundState, denoiser: Denoiser | None,
                      cfg: RunConfig, timer: StageTimer, abort: Callable[[], bool]) -> RoundState:
    """Steps 3-4: BSK-means++ rounds in the likelihood metric (+ pseudo-target DRVAE training)."""
    while state.round < cfg.cluster.n_rounds:
        started = time.perf_counter()
        with timer("align"):
            assignment, step = refiner.bsk_step(state.references, state.log_prior)
        changed = float(np.mean(assignment.labels != state.assignment.labels))
        entry = {"round": state.round + 1, "changed_fraction": changed,
                 "mean_cost": float(np.mean(assignment.cost))}
        if denoiser is not None:
            with timer("train"):
                entry["drvae_loss"] = pseudo_target_training(refiner, ws, assignment, denoiser, cfg, abort)
        sizes = np.bincount(assignment.labels, minlength=cfg.cluster.n_classes)
        entry.update(class_size_min=int(sizes.min()), class_size_max=int(sizes.max()))
        state = RoundState(state.round + 1, assignment, step.refs, step.log_prior, state.history + [entry],
                           denoiser.state_dict() if denoiser else None)
        save_checkpoint(cfg, state)
        logger.info("round %d/%d: %.1f%% of labels changed, class sizes %d-%d, %.1f s (%.0f particles/s)",
                    state.round, cfg.cluster.n_rounds, 100 * changed, sizes.min(), sizes.max(),
                    time.perf_counter() - started, len(ws) / (time.perf_counter() - started))
        if abort():
            raise AbortRequested("abort requested after a round")
        if changed < cfg.cluster.tolerance:
            logger.info("converged: fewer than %.2f%% of labels changed", 100 * cfg.cluster.tolerance)
            break
    return state


def pseudo_target_training(refiner: Refiner, ws: WorkingSet, assignment: Assignment,
                           denoiser: Denoiser, cfg: RunConfig, abort: Callable[[], bool]) -> float:
    """Step 3: reliable particles learn towards their class average placed at their pose."""
    reliable = reliable_mask(assignment.cost, assignment.labels, cfg.cluster.reliable_fraction)
    mask = torch.from_numpy(refiner.mask)
    points = ws.flipped[:, mask].contiguous()
    centres = refiner.aligned_means(points, assignment.labels, assignment.pose)
    psi, shift = refiner.grid.decode(assignment.pose[reliable])
    index = torch.from_numpy(np.nonzero(reliable)[0])
    placed = transform_images(centres[torch.from_numpy(assignment.labels[reliable])],
                              torch.from_numpy(psi).float(), torch.from_numpy(shift).float())
    weight = cfg.train.pseudo_target_weight
    targets = ws.flipped.clone()
    targets[index] = (1 - weight) * ws.flipped[index] + weight * placed
    return denoiser.train(ws.flipped, targets, cfg.train.epochs_per_round, abort)


def final_result(stack: ParticleStack, ctf, pixel_size: float, ws: WorkingSet, refiner: Refiner,
                 state: RoundState, abort: Callable[[], bool]) -> ClassificationResult:
    """Full-size averages from the final poses, converted to RELION's conventions."""
    assignment = state.assignment
    psi, shift_working = refiner.grid.decode(assignment.pose)
    shift = shift_working * ws.scale
    noise_var = ws.noise_var * ws.scale ** 2
    averages, resolution = class_averages(stack, ctf, pixel_size, assignment.labels, psi, shift,
                                          refiner.cfg.n_classes, noise_var, should_abort=abort)
    relion_psi, relion_origin = to_relion_pose(psi, shift)
    return ClassificationResult(labels=assignment.labels, psi_deg=relion_psi, origin_px=relion_origin,
                                confidence=np.clip(assignment.confidence, 0.0, 1.0),
                                class_averages=averages, class_resolution=resolution,
                                pixel_size=pixel_size, history=state.history)


def write_everything(cfg: RunConfig, table: ParticleTable, result: ClassificationResult) -> dict[str, Path]:
    """Pictures and config first, then the RELION outputs (data STAR last of all)."""
    prefix = cfg.output_prefix
    counts = np.bincount(result.labels, minlength=result.class_averages.shape[0])
    paths = {"classes_png": plots.plot_class_gallery(result.class_averages, counts, f"{prefix}_classes.png"),
             "convergence_png": plots.plot_convergence(result.history, f"{prefix}_convergence.png")}
    config_path = Path(f"{prefix}_config.yaml")
    with atomic_path(config_path) as tmp:
        tmp.write_text(f"# cryo-drvae {__version__}\n# {' '.join(sys.argv)}\n" + cfg.to_yaml())
    paths["config"] = config_path
    paths.update(write_run_outputs(prefix, table, result))
    checkpoint_path(cfg).unlink(missing_ok=True)
    return paths


def checkpoint_path(cfg: RunConfig) -> Path:
    return Path(f"{cfg.output_prefix}_checkpoint.pt")


def save_checkpoint(cfg: RunConfig, state: RoundState) -> None:
    with atomic_path(checkpoint_path(cfg)) as tmp:
        torch.save({"state": state, "config": cfg.to_yaml()}, tmp)


def load_checkpoint(cfg: RunConfig) -> RoundState | None:
    path = checkpoint_path(cfg)
    if not path.exists():
        logger.info("--continue: no checkpoint at %s, starting from the beginning", path)
        return None
    saved = torch.load(path, weights_only=False)
    if RunConfig.from_yaml(saved["config"]).cluster.n_classes != cfg.cluster.n_classes:
        raise ConfigError(f"{path}: checkpoint was made with a different --K; "
                          f"rerun without --continue or with the same --K")
    logger.info("--continue: resuming after round %d from %s", saved["state"].round, path)
    return saved["state"]


def restore_denoiser(state: RoundState, ws: WorkingSet, cfg: RunConfig,
                     device: torch.device) -> Denoiser | None:
    if state.denoiser is None:
        return None
    denoiser = Denoiser(ws.box_size, cfg.train, device, cfg.seed)
    denoiser.load_state_dict(state.denoiser)
    return denoiser
