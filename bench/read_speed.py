"""Images/s of the read path: the .mrcs stacks of a STAR file read in batches by DataLoader workers.

    python bench/read_speed.py --i particles.star [--workers 0,1,2] [--repeat 2]

For each worker count it times two passes over every particle, each with the stacks' pages first
dropped from the page cache (``posix_fadvise DONTNEED``, so each pass reads from the disk unless
the kernel keeps the pages):

* ``read``: raw images only (``ParticleStack.read`` per batch, as the workers run it);
* ``read + prepare``: ``prepare_working_set`` on the stack that ``pipeline.plan_working_set``
  normalised and planned, as ``classify`` runs it (normalisation, Fourier crop, whitening, CTF,
  phase flip), rows kept in RAM.

Prints images/s and MB/s of stack data for each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryo_drvae import pipeline  # noqa: E402
from cryo_drvae.config import RunConfig  # noqa: E402
from cryo_drvae.preprocess import prepare_working_set, read_batch_size  # noqa: E402
from cryo_drvae.stack import ParticleStack  # noqa: E402

class RawBatches(torch.utils.data.Dataset):
    """Batch ``i`` of raw images, as the preparation workers read it (no preparation)."""

    def __init__(self, stack: ParticleStack, batch_size: int):
        self.stack, self.batch_size = stack, batch_size

    def __len__(self) -> int:
        return -(-self.stack.n_particles // self.batch_size)

    def __getitem__(self, i: int) -> int:
        start = i * self.batch_size
        return len(self.stack.read(np.arange(start, min(start + self.batch_size, self.stack.n_particles))))


def drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget the cached pages of ``paths`` (clean pages only; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--i", required=True, type=Path, help="particles STAR file")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    parser.add_argument("--repeat", type=int, default=2, help="passes per setting (the best is printed)")
    args = parser.parse_args(argv)

    cfg = RunConfig.from_options(particles_star=str(args.i))
    table = pipeline.read_particles(cfg)
    raw = pipeline.read_stack(table, cfg)                  # raw reads: not normalised
    stack = pipeline.read_stack(table, cfg)                # normalised and planned as classify does
    plan = pipeline.plan_working_set(stack, pipeline.read_ctf(table, cfg), pipeline.single_pixel_size(table), cfg)
    box = plan.working_box
    stacks = sorted({stack.location(i).stack_path for i in range(stack.n_particles)})
    megabytes = sum(p.stat().st_size for p in stacks) / 1e6
    batch = read_batch_size(stack.box_size)
    n = stack.n_particles
    print(f"{n} particles, box {stack.box_size} px, {len(stacks)} stacks, {megabytes:.0f} MB; "
          f"read batches of {batch}; working box {box} px; {os.cpu_count()} CPUs")
    print("| workers | what | best wall s | images/s | MB/s |")
    print("|---|---|---|---|---|")
    for workers in (int(w) for w in args.workers.split(",")):
        def read_only() -> None:
            loader = torch.utils.data.DataLoader(RawBatches(raw, batch), batch_size=None, num_workers=workers)
            assert sum(loader) == n

        def read_and_prepare() -> None:
            prepare_working_set(stack, plan, workers=workers)

        for name, run in (("read", read_only), ("read + prepare", read_and_prepare)):
            best = np.inf
            for _ in range(args.repeat):
                raw.close()                       # mapped pages cannot be dropped
                stack.close()
                drop_page_cache(stacks)
                best = min(best, timed(run))
            print(f"| {workers} | {name} | {best:.2f} | {n / best:,.0f} | {megabytes / best:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
