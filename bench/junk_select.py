"""Junk and selection on a simulated set: what a person keeping mostly-good classes gets, and what
``cryo-drvae select`` keeps, as precision and recall of the good particles.

    python bench/junk_select.py --sim SIMDIR --run RUN_PREFIX [--select SELECTDIR] [--label TEXT]

``SIMDIR`` is a ``cryo-drvae simulate --junk F`` folder (truth class 0 = junk), ``RUN_PREFIX`` a
``classify`` output prefix (or a RELION ``run_itNNN``: its ``_data.star``), ``SELECTDIR`` a
``cryo-drvae select`` output folder. Prints one markdown row (``--header``: the header first), then
the person's precision and recall when they also leave out particles below the default
``rlnParticleFigureOfMerit`` threshold (when the data STAR has it), and a line with what the
person's classes and the selection keep of each junk kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryo_drvae.evaluate import true_classes  # noqa: E402
from cryo_drvae.junk import JUNK_KINDS  # noqa: E402
from cryo_drvae.screening import DEFAULT_MIN_FOM  # noqa: E402
from cryo_drvae.star_io import PARTICLE_FIGURE_OF_MERIT as FOM  # noqa: E402
from cryo_drvae.star_io import read_particles  # noqa: E402

HEADER = ("| set | K | good / junk picks | person keeping >= 50 %-good classes: precision / recall | "
          "views owning a class | `select` default: precision / recall | classes kept |\n|---|---|---|---|---|---|---|")


def precision_recall(kept_truth: np.ndarray, n_good: int) -> tuple[float, float]:
    good = int((kept_truth > 0).sum())
    return (good / len(kept_truth) if len(kept_truth) else 0.0), good / max(n_good, 1)


def person_choice(truth: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Particles a person keeps when keeping every class that is at least half good, and how many
    real views are the majority of some class."""
    kept = np.zeros(len(truth), bool)
    owned = set()
    for c in np.unique(labels):
        members = truth[labels == c]
        if (members > 0).mean() >= 0.5:
            kept |= labels == c
            owned.add(int(np.bincount(members).argmax()))
    owned.discard(0)
    return kept, len(owned)


def read_selected(select_dir: Path) -> pd.DataFrame:
    """The particles a ``cryo-drvae select`` folder kept."""
    return read_particles(select_dir / "particles.star").particles


def select_scores(sim_dir: Path, selected: pd.DataFrame, n_good: int) -> tuple[float, float, int]:
    """Precision and recall of the good particles among ``selected``, and its number of classes."""
    precision, recall = precision_recall(true_classes(sim_dir / "truth.csv", selected["rlnImageName"]), n_good)
    return precision, recall, len(np.unique(selected["rlnClassNumber"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sim", type=Path, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--select", type=Path)
    parser.add_argument("--label", default="")
    parser.add_argument("--header", action="store_true")
    args = parser.parse_args(argv)
    data = read_particles(Path(f"{args.run}_data.star")).particles
    truth = true_classes(args.sim / "truth.csv", data["rlnImageName"])
    labels = data["rlnClassNumber"].to_numpy()
    n_good, n_views = int((truth > 0).sum()), len(np.unique(truth[truth > 0]))
    kept, owned = person_choice(truth, labels)
    person = precision_recall(truth[kept], n_good)
    chosen = "not run"
    selected = read_selected(args.select) if args.select else None
    if selected is not None:
        precision, recall, n_kept = select_scores(args.sim, selected, n_good)
        chosen = f"{precision:.3f} / {recall:.3f} | {n_kept}"
    if args.header:
        print(HEADER)
    print(f"| {args.label or args.sim.name} | {len(np.unique(labels))} | {n_good} / {len(truth) - n_good} | "
          f"{person[0]:.3f} / {person[1]:.3f} | {owned} of {n_views} | {chosen} |")
    if FOM in data:
        fitting = kept & (data[FOM].to_numpy() >= DEFAULT_MIN_FOM)
        screened = precision_recall(truth[fitting], n_good)
        print(f"person's classes less {FOM} < {DEFAULT_MIN_FOM:g}: precision / recall "
              f"{screened[0]:.3f} / {screened[1]:.3f}")
    kinds = junk_kinds(args.sim / "truth.csv", data["rlnImageName"])
    kept_by_select = (np.isin(data["rlnImageName"], selected["rlnImageName"]) if selected is not None
                      else np.zeros(len(kinds), bool))
    print("junk kept (person's classes / select) of all: " + ", ".join(
        f"{kind} {int((kept & (kinds == kind)).sum())} / {int((kept_by_select & (kinds == kind)).sum())} "
        f"of {int((kinds == kind).sum())}" for kind in JUNK_KINDS))
    return 0


def junk_kinds(truth_csv: Path, names) -> np.ndarray:
    """The truth's ``kind`` of each named image."""
    truth = pd.read_csv(truth_csv).set_index("image_name")
    return truth.loc[list(names), "kind"].to_numpy()


if __name__ == "__main__":
    sys.exit(main())
