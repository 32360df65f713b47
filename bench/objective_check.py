"""Is a wrong classification a search failure or an objective failure? (issue 10's diagnosis)

For one bench set, the classes grown as ``classify`` grows them are compared with EM started from
the true templates, under three criteria a move could be judged by:

* the marginal log-likelihood (the default judge of split-and-merge moves),
* the log evidence (references integrated out, ``--move_criterion evidence``),
* the cross-validated log-likelihood: the particles are dealt into two halves; each half is scored
  against references made only from the other half's members (at the state's posteriors and
  poses), so a class that fits its own members' noise gains nothing.

If a criterion prefers the true-template state, a better search would help; if every criterion
prefers the wrong grown state, the objective itself must change. The script also prints how EM
from the true templates drifts, and the confusion matrix of the grown classes.

    python bench/objective_check.py --set kpr-imbalanced-s1 [--em_steps 3] [--work_dir bench_work]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import benchlib as bl  # noqa: E402
from cryo_drvae import pipeline  # noqa: E402
from cryo_drvae.config import RunConfig  # noqa: E402
from cryo_drvae.distributed import Comm  # noqa: E402
from cryo_drvae.evaluate import score_labels  # noqa: E402
from cryo_drvae.refine import EMState, Refiner, posterior, total_log_likelihood  # noqa: E402
from cryo_drvae.splitting import grow_classes  # noqa: E402


def split_halves(refiner: Refiner, seed: int = 0) -> list[Refiner]:
    """A refiner for each of two random halves of the particles."""
    first = np.random.default_rng(seed).permutation(len(refiner.ws)) % 2 == 0
    return [Refiner(refiner.ws.subset(np.nonzero(side)[0]), refiner.cfg, refiner.device)
            for side in (first, ~first)]


def cross_validated_log_likelihood(halves: list[Refiner], state: EMState) -> float:
    """log p(half A | references of half B) + log p(half B | references of half A).

    Each half's references are the M-step of its own particles at ``state``'s posteriors and poses
    (one E-step against ``state.refs``); the class priors are ``state``'s.
    """
    prior = torch.from_numpy(state.log_prior).float()
    refs = []
    for half in halves:
        loglik, _, stats = half.expectation(state.refs, prior)
        stats.weights = torch.from_numpy(posterior(loglik, state.log_prior).sum(0, dtype=np.float64))
        refs.append(half.references(stats))
    total = 0.0
    for h, half in enumerate(halves):
        loglik, _, _ = half.expectation(refs[1 - h], prior, soft_statistics=False)
        total += total_log_likelihood(EMState(refs[1 - h], state.log_prior, loglik, None))
    return total


def prepared_refiner(sim: bl.SimulatedSet, threads: int) -> Refiner:
    """The working set and refiner of ``sim`` made by ``classify``'s own stages, with the options
    the bench passes (``benchlib.cryo_drvae_command``)."""
    cfg = RunConfig.from_options(particles_star=str(sim.star_path), data_dir=str(sim.star_path.parent),
                                 n_classes=sim.config.n_classes, particle_diameter=sim.config.diameter,
                                 seed=sim.config.seed, threads=threads)
    table = pipeline.read_particles(cfg)
    stack = pipeline.read_stack(table, cfg)
    _, ws = pipeline.prepare(stack, pipeline.read_ctf(table, cfg), pipeline.single_pixel_size(table), cfg,
                             Comm(), None, lambda: False)
    stack.close()
    return Refiner(ws, cfg.cluster, torch.device("cpu"))


def report(name: str, refiner: Refiner, halves: list[Refiner], state: EMState, truth: np.ndarray) -> None:
    """One line: the three criteria of ``state`` (its ``loglik`` that of its own references) and its accuracy."""
    labels = posterior(state.loglik, state.log_prior).argmax(1)
    print(f"{name:24s} log-likelihood {total_log_likelihood(state):11.1f}   "
          f"log evidence {refiner.log_evidence(state)[0]:11.1f}   "
          f"cross-validated {cross_validated_log_likelihood(halves, state):11.1f}   "
          f"accuracy {score_labels(truth, labels).accuracy:.3f}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", required=True, help="a bench set (bench/benchlib.py SETS), e.g. kpr-imbalanced-s1")
    parser.add_argument("--em_steps", type=int, default=3, help="EM steps from the true templates")
    parser.add_argument("--work_dir", default="bench_work", help="where the bench's simulated sets are cached")
    parser.add_argument("--j", type=int, default=2, help="CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.j)
    sim = bl.simulate_cached(bl.SETS[args.set], Path(args.work_dir))
    truth = sim.labels
    refiner = prepared_refiner(sim, args.j)
    halves = split_halves(refiner)
    started = time.perf_counter()
    grown = grow_classes(refiner, sim.config.n_classes)     # its loglik is its own references'
    print(f"classes grown in {time.perf_counter() - started:.0f} s", flush=True)
    report("grown (classify's start)", refiner, halves, grown, truth)
    state = bl.true_template_state(refiner, sim.templates_path)
    for step in range(args.em_steps + 1):
        stepped = refiner.em_step(state.refs, state.log_prior, floor=0.0)   # one E-step scores and steps
        report(f"true templates + {step} EM", refiner, halves,
               EMState(state.refs, state.log_prior, stepped.loglik, stepped.best_pose), truth)
        state = stepped
    labels = posterior(grown.loglik, grown.log_prior).argmax(1)
    print("\ngrown classes (columns) against the true views (rows):")
    print(pd.crosstab(pd.Series(truth, name="view"), pd.Series(labels + 1, name="class")).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
