"""Particles/s of one BSK-means++ refinement round (``Refiner.bsk_step``) at a given K.

    python bench/round_speed.py --i particles.star --K 100 [--j 2] [--psi_step 10] [--working_box W]
        [--search_margin NATS]

References are K particles of the set (then one warm-up round sharpens them); the second round
is timed. Prints wall and CPU seconds and particles/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryo_drvae.config import DIAMETER_FRACTION, ClusterConfig  # noqa: E402
from cryo_drvae.ctf import params_from_particles  # noqa: E402
from cryo_drvae.preprocess import WorkingSet, choose_working_box, plan_preparation, prepare_working_set  # noqa: E402
from cryo_drvae.refine import Refiner  # noqa: E402
from cryo_drvae.stack import ParticleStack  # noqa: E402
from cryo_drvae.star_io import pixel_sizes, read_particles  # noqa: E402


def working_set(star: Path, working_box: int = 0) -> tuple[WorkingSet, int]:
    """The particles of ``star`` prepared as ``classify`` prepares them (box by its rule when 0)."""
    table = read_particles(star)
    stack = ParticleStack.from_table(table)
    pixel = float(pixel_sizes(table)[0])
    diameter = DIAMETER_FRACTION * stack.box_size * pixel
    box = choose_working_box(stack.box_size, pixel, working_box, particle_diameter=diameter)
    ctf = params_from_particles(table.per_particle(), str(table.path))
    return prepare_working_set(stack, plan_preparation(stack, ctf, pixel, diameter, box, 0)), box


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time one refinement round.")
    parser.add_argument("--i", type=Path, required=True)
    parser.add_argument("--K", type=int, default=100)
    parser.add_argument("--j", type=int, default=2)
    parser.add_argument("--psi_step", type=float, default=10.0)
    parser.add_argument("--working_box", type=int, default=0, help="as classify's (0: its rule)")
    parser.add_argument("--search_margin", type=float, default=ClusterConfig.search_margin,
                        help="as classify's (0: every class scored exactly)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.j)
    torch.set_flush_denormal(True)
    ws, box = working_set(args.i, args.working_box)
    cfg = ClusterConfig(n_classes=args.K, psi_step=args.psi_step, search_margin=args.search_margin)
    ref = Refiner(ws, cfg, torch.device("cpu"))
    rows = np.random.default_rng(0).choice(len(ws), args.K, replace=False)
    refs = ws.flipped[rows] * ref.solvent_mask
    _, state = ref.bsk_step(refs, np.full(args.K, -np.log(args.K)))
    cpu, wall = time.process_time(), time.perf_counter()
    ref.bsk_step(state.refs, state.log_prior)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    shortlist = ref.last_shortlist
    scored = f"{shortlist.mean_classes:.1f}" if shortlist is not None else str(args.K)
    print(f"K = {args.K}, {len(ws)} particles, working box {box}, psi {args.psi_step}°, "
          f"search margin {args.search_margin:g}, {args.j} threads: "
          f"{wall:.2f} s wall, {cpu:.2f} CPU-s, {len(ws) / wall:.0f} particles/s; "
          f"{scored} classes per particle scored exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
