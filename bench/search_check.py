"""Does the coarse class search keep each particle's best class? One E-step, two ways.

    python bench/search_check.py --sim SIM_DIR [--j 2] [--working_box W] [--psi_step 10]
        [--search_margin NATS] [--references true|round]

References are the simulation's true templates (``templates.mrcs``) at the working box, scaled
by the excess image energy, or (``--references round``) those one round makes from K random
particles, as ``bench/round_speed.py`` times. The same E-step runs exhaustively (every class,
every pose) and with the class search (``search.py``); it prints the classes scored exactly per
particle, the share of particles whose exhaustive best class was left out (*missed*), label and
pose agreement with the exhaustive E-step, the largest error of the own class's log-likelihood,
and the seconds each E-step took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from cryo_drvae.config import ClusterConfig  # noqa: E402
from cryo_drvae.refine import Refiner, posterior  # noqa: E402
from round_speed import working_set  # noqa: E402


def timed_expectation(ref: Refiner, refs: torch.Tensor, prior: torch.Tensor):
    start = time.perf_counter()
    loglik, pose, _ = ref.expectation(refs, prior, soft_statistics=False)
    return loglik, pose, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Missed-best-class rate of the coarse class search.")
    parser.add_argument("--sim", type=Path, required=True, help="a `cryo-drvae simulate` output folder")
    parser.add_argument("--j", type=int, default=2)
    parser.add_argument("--psi_step", type=float, default=10.0)
    parser.add_argument("--working_box", type=int, default=0, help="as classify's (0: its rule)")
    parser.add_argument("--search_margin", type=float, default=ClusterConfig.search_margin)
    parser.add_argument("--references", choices=("true", "round"), default="true",
                        help="true templates, or the references after one round from K random particles "
                             "(as bench/round_speed.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.j)
    torch.set_flush_denormal(True)
    ws, box = working_set(args.sim / "particles.star", args.working_box)
    with mrcfile.open(args.sim / "templates.mrcs") as mrc:
        templates = np.array(mrc.data)
    k = len(templates)

    def refiner(margin: float) -> Refiner:
        return Refiner(ws, ClusterConfig(n_classes=k, psi_step=args.psi_step, search_margin=margin),
                       torch.device("cpu"))

    exhaustive = refiner(0.0)
    log_prior = np.full(k, -np.log(k))
    if args.references == "true":
        refs = bl.template_references(templates, box) * exhaustive.solvent_mask
        refs = refs * bl._moment_scale(ws, refs)
    else:
        rows = np.random.default_rng(0).choice(len(ws), k, replace=False)
        _, state = refiner(args.search_margin).bsk_step(ws.flipped[rows] * exhaustive.solvent_mask, log_prior)
        refs, log_prior = state.refs, state.log_prior
    prior = torch.from_numpy(log_prior).float()
    loglik, pose, seconds = timed_expectation(exhaustive, refs, prior)
    labels = posterior(loglik, log_prior).argmax(1)
    rows = np.arange(len(labels))
    print(f"{args.sim.name}: {len(ws)} particles, K = {k}, working box {box}, psi {args.psi_step}°, "
          f"{args.j} threads; exhaustive E-step {seconds:.1f} s")
    ref = refiner(args.search_margin)
    loglik2, pose2, seconds = timed_expectation(ref, refs, prior)
    shortlist = ref.last_shortlist                       # as the E-step widened it
    labels2 = posterior(loglik2, log_prior).argmax(1)
    missed = ~shortlist.chosen.numpy()[rows, labels]
    same_pose = pose[rows, labels] == pose2[rows, labels]
    error = np.abs(loglik2 - loglik)[rows, labels]
    print(f"  class search, margin {args.search_margin:g}: {shortlist.mean_classes:.1f} classes scored exactly, "
          f"missed best class {missed.mean():.2%}, labels agree {np.mean(labels == labels2):.2%}, poses agree "
          f"{same_pose.mean():.2%}, own-class log-likelihood off by at most {error.max():.3g} nats; "
          f"E-step {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
