"""Scaling benchmark: wall time, particles/s, peak RSS and accuracy against the particle count.

    python bench/bench_scale.py [--sizes 2000,20000,200000] [--j 2] [--iter 4] [--gpu 0]

Per size: simulate (seeded, box 64, 3 Å/px, SNR 0.05; K = 10 for 2,000 particles, 50 above;
cached under ``<out>/sims``), run ``cryo-drvae classify`` as a user would, and read back the
accuracy, the per-stage times and the rounds' particles/s from its log. Prints one table and
writes it to ``bench/scale_results.md``; the per-particle time and the RSS ratio against the
smallest set of K = 50 show whether time is linear and memory flat in N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import benchlib as bl  # noqa: E402
from cryo_drvae.evaluate import evaluate_run  # noqa: E402
from cryo_drvae.simulate import SimulationConfig  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SNR = 0.05


@dataclass
class ScaleRow:
    n_particles: int
    n_classes: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    round_rate: float          # particles/s of the classification rounds (median over rounds)
    stages: str
    accuracy: float
    device: str

    @property
    def us_per_particle(self) -> float:
        return 1e6 * self.wall_s / self.n_particles


def classes_for(n_particles: int) -> int:
    return 10 if n_particles <= 2000 else 50


def scale_set(n_particles: int) -> bl.BenchSet:
    sim = SimulationConfig(n_classes=classes_for(n_particles), n_particles=n_particles, snr=SNR, box_size=64,
                           pixel_size=3.0, seed=bl.SEED, particles_per_stack=1000)
    return bl.BenchSet(f"scale{n_particles}", sim)


def parse_log(text: str) -> tuple[float, str]:
    """Median particles/s of the rounds and the stage-time line of a cryo-drvae log."""
    rates = sorted(float(r) for r in re.findall(r"\((\d+) particles/s", text))
    stages = re.findall(r"stage times \(s\): (.*)", text)
    return (rates[len(rates) // 2] if rates else float("nan")), (stages[-1] if stages else "")


def run_size(n_particles: int, args: argparse.Namespace) -> ScaleRow:
    sim = bl.simulate_cached(scale_set(n_particles), args.out)
    folder = args.out / f"scale{n_particles}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    extra = ["--iter", str(args.iter)] + (["--gpu", args.gpu] if args.gpu is not None else [])
    command = bl.cryo_drvae_command(sim, folder / "run", args.j, extra)
    measured = bl.run_measured(command, sim.out_dir, folder / "stdout.log", args.j)
    rate, stages = parse_log((folder / "stdout.log").read_text())
    scores = evaluate_run(sim.truth_path, folder / "run_data.star")
    device = f"GPU {args.gpu}" if args.gpu is not None else f"CPU x{args.j}"
    return ScaleRow(n_particles, sim.config.n_classes, measured.wall_s, measured.cpu_s,
                    measured.peak_rss_mb or float("nan"), rate, stages, scores.accuracy, device)


def table(rows: list[ScaleRow]) -> str:
    head = ("| particles | K | device | wall s | CPU s | µs/particle | rounds particles/s | peak RSS MB "
            "| accuracy | stage times (s) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r.n_particles} | {r.n_classes} | {r.device} | {r.wall_s:.0f} | {r.cpu_s:.0f} | "
             f"{r.us_per_particle:.0f} | {r.round_rate:.0f} | {r.peak_rss_mb:.0f} | {r.accuracy:.3f} | {r.stages} |"
             for r in rows]
    return "\n".join([head, *lines])


def ratios(rows: list[ScaleRow]) -> list[str]:
    """Time per particle and peak RSS of each K = 50 set against the smallest K = 50 set."""
    big = sorted((r for r in rows if r.n_classes == 50), key=lambda r: r.n_particles)
    if len(big) < 2:
        return []
    base = big[0]
    return [f"{r.n_particles} vs {base.n_particles}: time per particle x{r.us_per_particle / base.us_per_particle:.2f}, "
            f"rounds' time per particle x{base.round_rate / r.round_rate:.2f}, "
            f"peak RSS x{r.peak_rss_mb / base.peak_rss_mb:.2f}" for r in big[1:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000,200000", help="comma list of particle counts")
    parser.add_argument("--j", type=int, default=2, help="CPU threads")
    parser.add_argument("--iter", type=int, default=4, help="classification rounds (the same for every size)")
    parser.add_argument("--gpu", default=None, help="GPU id, e.g. 0 (default: CPU)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "work" / "scale", help="work folder")
    parser.add_argument("--report", type=Path, default=BENCH_DIR / "scale_results.md")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    store = args.out / "scale_results.json"
    saved = json.loads(store.read_text()) if store.exists() else {"rows": [], "commands": []}
    command = "python bench/bench_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    saved["commands"].append(command)
    for size in (int(s) for s in args.sizes.split(",")):
        row = run_size(size, args)
        key = (row.n_particles, row.device, args.iter)
        saved["rows"] = [r for r in saved["rows"] if (r["n_particles"], r["device"], r["iter"]) != key]
        saved["rows"].append({**dataclasses.asdict(row), "iter": args.iter})
        store.write_text(json.dumps(saved, indent=1))
        print(table([row]), flush=True)
    groups = sorted({r["iter"] for r in saved["rows"]})
    sections = []
    for n_iter in groups:
        rows = [ScaleRow(**{k: v for k, v in r.items() if k != "iter"}) for r in saved["rows"] if r["iter"] == n_iter]
        rows.sort(key=lambda r: (r.device, r.n_particles))
        sections += [f"## --iter {n_iter}", "", table(rows), "", *ratios(rows), ""]
    text = "\n".join([
        "# cryo-drvae scaling (simulated, box 64, SNR 0.05)", "",
        f"Machine: {bl.machine_line()}", "", "Commands:", "",
        *[f"    {c}" for c in saved["commands"]], "", *sections])
    args.report.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
