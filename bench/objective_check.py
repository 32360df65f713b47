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

import mrcfile
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import benchlib as bl  # noqa: E402
from cryo_drvae.checks import background_radius_px  # noqa: E402
from cryo_drvae.config import ClusterConfig  # noqa: E402
from cryo_drvae.ctf import params_from_particles  # noqa: E402
from cryo_drvae.evaluate import score_labels  # noqa: E402
from cryo_drvae.preprocess import choose_working_box, plan_preparation, prepare_working_set  # noqa: E402
from cryo_drvae.refine import EMState, Refiner, posterior, total_log_likelihood  # noqa: E402
from cryo_drvae.splitting import grow_classes  # noqa: E402
from cryo_drvae.stack import ParticleStack  # noqa: E402
from cryo_drvae.star_io import pixel_sizes, read_particles  # noqa: E402


def split_halves(refiner: Refiner, seed: int = 0) -> tuple[list[np.ndarray], list[Refiner]]:
    """The particles dealt at random into two halves, and a refiner for each."""
    n = len(refiner.ws)
    first = np.random.default_rng(seed).permutation(n) % 2 == 0
    rows = [np.nonzero(first)[0], np.nonzero(~first)[0]]
    return rows, [Refiner(refiner.ws.subset(r), refiner.cfg, refiner.device) for r in rows]


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


def prepared_refiner(sim: bl.SimulatedSet, cluster: ClusterConfig) -> Refiner:
    """The working set and refiner of ``sim`` as ``classify`` prepares them."""
    table = read_particles(sim.star_path)
    stack = ParticleStack.from_table(table, data_dir=sim.star_path.parent)
    ctf = params_from_particles(table.per_particle(), str(table.path))
    pixel_size, diameter = float(pixel_sizes(table)[0]), sim.config.diameter
    stack.normalise(background_radius_px(diameter, stack.box_size, pixel_size))
    box = choose_working_box(stack.box_size, pixel_size, 0, diameter)
    ws = prepare_working_set(stack, plan_preparation(stack, ctf, pixel_size, diameter, box, sim.config.seed))
    stack.close()
    return Refiner(ws, cluster, torch.device("cpu"))


def true_template_state(refiner: Refiner, sim: bl.SimulatedSet) -> EMState:
    """The true templates at the working box and the amplitude that fits the data best."""
    with mrcfile.open(sim.templates_path, permissive=True) as mrc:
        refs = bl.template_references(np.array(mrc.data), refiner.ws.box_size) * refiner.solvent_mask
    refs = refs * bl.fit_template_scale(refiner, refs, bl._moment_scale(refiner.ws, refs))
    k = refs.shape[0]
    return EMState(refs, np.full(k, -np.log(k)), None, None)


def report(name: str, refiner: Refiner, halves: list[Refiner], state: EMState, truth: np.ndarray) -> None:
    """One line: the three criteria of ``state`` (after one E-step on its references) and its accuracy."""
    scored = refiner.em_step(state.refs, state.log_prior, floor=0.0)
    scored = EMState(state.refs, state.log_prior, scored.loglik, scored.best_pose)
    labels = posterior(scored.loglik, scored.log_prior).argmax(1)
    print(f"{name:24s} log-likelihood {total_log_likelihood(scored):11.1f}   "
          f"log evidence {refiner.log_evidence(scored)[0]:11.1f}   "
          f"cross-validated {cross_validated_log_likelihood(halves, scored):11.1f}   "
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
    k = sim.config.n_classes
    refiner = prepared_refiner(sim, ClusterConfig(n_classes=k))
    _, halves = split_halves(refiner)
    started = time.perf_counter()
    grown = grow_classes(refiner, k)
    print(f"classes grown in {time.perf_counter() - started:.0f} s", flush=True)
    report("grown (classify's start)", refiner, halves, grown, truth)
    state = true_template_state(refiner, sim)
    for step in range(args.em_steps + 1):
        report(f"true templates + {step} EM", refiner, halves, state, truth)
        state = refiner.em_step(state.refs, state.log_prior, floor=0.0)
    labels = posterior(grown.loglik, grown.log_prior).argmax(1)
    print("\ngrown classes (columns) against the true views (rows):")
    print(pd.crosstab(pd.Series(truth, name="view"), pd.Series(labels + 1, name="class")).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
