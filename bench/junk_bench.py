"""Junk picks side by side: cryo-drvae (classify + select) and RELION 3.1.3 Class2D on one junk set.

    python bench/junk_bench.py [--out bench-work/junk] [--j 2] [--skip relion] [--relion_iter 25]
        [--ours PREFIX] [--relion PREFIX_itNNN]

The set: 3KPR (``../shared/data/structures``), 10 views x 200 + 800 junk picks (empty ice, discs,
carbon edges, aggregates, broken particles), SNR 0.02, box 64, seed 31, classified with K = 20 as
users over-ask K. For each method: what a person keeping every mostly-good class gets, and what
``cryo-drvae select`` keeps with its defaults (on RELION's output it measures the figure of merit
itself), as precision and recall of the good particles. ``--ours``/``--relion`` score existing runs
instead of running them. Prints a markdown table and writes it to ``bench/junk_results.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib as bl  # noqa: E402
from junk_select import person_choice, precision_recall, read_selected, select_scores  # noqa: E402
from cryo_drvae.evaluate import true_classes  # noqa: E402
from cryo_drvae.simulate import SimulationConfig  # noqa: E402
from cryo_drvae.star_io import read_particles  # noqa: E402

K = 20
JUNK_SET = bl.BenchSet("kpr-junk-s31", SimulationConfig(
    n_classes=10, n_particles=2800, snr=0.02, box_size=64, pixel_size=0.0, junk_fraction=800 / 2800,
    pdb_files=(str(bl.STRUCTURES / "3KPR.cif.gz"),), seed=31))
HEADER = ("| method | wall s | CPU-s | person's classes: precision / recall | views owning a class | "
          "`select` (defaults): precision / recall | classes kept |\n|---|---|---|---|---|---|---|")


def with_k(cmd: list[str], k: int) -> list[str]:
    """``cmd`` with the value after ``--K`` replaced by ``k``."""
    cmd = list(cmd)
    cmd[cmd.index("--K") + 1] = str(k)
    return cmd


def run_select(prefix: Path, out_dir: Path, project: Path) -> Path:
    """``cryo-drvae select`` with its defaults, from the set's folder (RELION's image paths are relative to it)."""
    cmd = [str(bl.REPO_ROOT / ".venv" / "bin" / "cryo-drvae"), "select", "--i", str(prefix.resolve()),
           "--o", str(out_dir.resolve())]
    subprocess.run(cmd, cwd=project, check=True, capture_output=True, text=True)
    return out_dir


def junk_row(method: str, sim_dir: Path, data_star: Path, select_dir: Path,
             measured: bl.Measurement | None) -> str:
    """One table row: the person's choice and select's, against the truth."""
    data = read_particles(data_star).particles
    truth = true_classes(sim_dir / "truth.csv", data["rlnImageName"])
    n_good = int((truth > 0).sum())
    kept, owned = person_choice(truth, data["rlnClassNumber"].to_numpy())
    person = precision_recall(truth[kept], n_good)
    precision, recall, n_kept = select_scores(sim_dir, read_selected(select_dir), n_good)
    wall, cpu = ("-", "-") if measured is None else (f"{measured.wall_s:.0f}", f"{measured.cpu_s:.0f}")
    n_views = len(np.unique(truth[truth > 0]))
    return (f"| {method} | {wall} | {cpu} | {person[0]:.3f} / {person[1]:.3f} | {owned} of {n_views} | "
            f"{precision:.3f} / {recall:.3f} | {n_kept} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench-work/junk"))
    parser.add_argument("--j", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: cryo-drvae, relion")
    parser.add_argument("--relion_iter", type=int, default=bl.RELION_TARGET_ITER)
    parser.add_argument("--ours", type=Path, help="score this classify prefix instead of running classify")
    parser.add_argument("--relion", type=Path, help="score this RELION run_itNNN prefix instead of running RELION")
    parser.add_argument("--report", type=Path, default=bl.REPO_ROOT / "bench" / "junk_results.md")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    sim = bl.simulate_cached(JUNK_SET, args.out)
    rows = []
    if "cryo-drvae" not in skip:
        measured, prefix = None, args.ours
        if prefix is None:
            prefix = args.out / "cryo-drvae" / "run"
            prefix.parent.mkdir(parents=True, exist_ok=True)
            measured = bl.run_measured(with_k(bl.cryo_drvae_command(sim, prefix, args.j), K), sim.out_dir,
                                       prefix.parent / "stdout.log", args.j)
        chosen = run_select(prefix, args.out / "cryo-drvae-select", sim.out_dir)
        rows.append(junk_row(f"cryo-drvae {bl.git_commit()}", sim.out_dir, Path(f"{prefix}_data.star"), chosen,
                             measured))
    if "relion" not in skip:
        measured, prefix = None, args.relion
        if prefix is None:
            run = args.out / "relion" / "run"
            run.parent.mkdir(parents=True, exist_ok=True)
            measured = bl.run_measured(with_k(bl.relion_command(sim, run, args.j, args.relion_iter), K),
                                       sim.out_dir, run.parent / "stdout.log", args.j)
            prefix = Path(f"{run}_it{args.relion_iter:03d}")
        chosen = run_select(prefix, args.out / "relion-select", sim.out_dir)
        rows.append(junk_row("RELION 3.1.3", sim.out_dir, Path(f"{prefix}_data.star"), chosen, measured))
    text = "\n".join([f"# Junk set {JUNK_SET.name}, K = {K}", "", bl.machine_line(), "", HEADER, *rows, ""])
    print(text)
    args.report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
