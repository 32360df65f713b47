"""Runtime set-up of a classification: threads, device, seeds, stage timing, scratch folders.

>>> device = set_up(cfg, comm)     # threads, denormals, device (+ TF32), seeds, determinism on CPU
>>> timer = StageTimer()
>>> with timer("read"):
...     ...
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, gpu_ids
from .distributed import Comm
from .errors import ConfigError


def set_up(cfg: RunConfig, comm: Comm) -> torch.device:
    """Threads, denormals, the device, seeds and (on the CPU) deterministic algorithms."""
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)   # tiny posteriors as denormals slow CPU matmuls many-fold
    device = resolve_device(cfg.device, comm)
    seed_everything(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)   # --seed: same result, bit for bit
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (code that draws numbers takes its own seeded generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str, comm: Comm = Comm()) -> torch.device:
    """``cpu`` or ``cuda:<ids>``; with several ranks on a node, rank r takes the r-th listed GPU."""
    if not name.startswith("cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpu was given but CUDA is not available (torch {torch.__version__}); "
                          f"run without --gpu on this machine")
    ids = gpu_ids(name)
    if max(ids) >= torch.cuda.device_count():
        raise ConfigError(f"--gpu: device {max(ids)} requested but only {torch.cuda.device_count()} "
                          f"CUDA device(s) visible")
    device = torch.device(f"cuda:{ids[comm.local_rank % len(ids)]}")
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True   # TF32 scores: same labels, several times faster
    return device


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


def scratch_folder(cfg: RunConfig, comm: Comm) -> Path | None:
    """Where this rank streams its working images (None: kept in RAM, ``--preread_images``)."""
    if cfg.data.preread_images:
        return None
    prefix = Path(cfg.output_prefix)
    base = Path(cfg.data.scratch_dir) if cfg.data.scratch_dir else prefix.parent
    return base / f"{prefix.name}_scratch" / f"rank{comm.rank}"


def remove_scratch(folder: Path | None) -> None:
    """Delete this rank's scratch files (and the scratch folder once no rank uses it)."""
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()
    except OSError:
        pass    # other ranks' folders are still there, or it was never created


def loader_workers(cfg: RunConfig, n_particles: int) -> int:
    """DataLoader processes reading and preparing particles: ``--j`` for large sets, none for small."""
    return min(cfg.threads, 8) if n_particles >= 20_000 else 0
