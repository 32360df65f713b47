"""Benchmark cryo-drvae against RELION 3.1.3 and a true-template oracle on simulated sets.

    python bench/run_bench.py --sets easy,standard --j 2 [--out bench/work] [--relion-iter N]

Per set: simulate (seeded, cached by config), run ``cryo-drvae classify`` (defaults, true K),
``relion_refine`` (2D, 25 iterations) and the oracle; on *standard* and *hard* also the ablations
``--balance 0`` (no balance constraint) and ``--drvae`` (the paper's DRVAE start). Every finished row goes into ``<out>/results.json``; the
table is printed and ``bench/results.md`` and ``bench/results.png`` are rewritten from all
stored rows after every method, so they always reflect every set finished so far.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import benchlib as bl  # noqa: E402

logger = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
# the default run has no DRVAE (docs/method.md), so the DRVAE ablation adds it
ABLATIONS = {"cryo-drvae --balance 0": ["--balance", "0"], "cryo-drvae --drvae": ["--drvae"],
             "cryo-drvae --no_split_merge": ["--no_split_merge"],
             "cryo-drvae --reference_filter wiener": ["--reference_filter", "wiener"],
             "cryo-drvae --reference_filter ml": ["--reference_filter", "ml"]}
SKIPPABLE = ("cryo-drvae", "relion", "oracle", "ablations")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="easy", help=f"comma list of {', '.join(bl.SETS)}, or 'all'")
    parser.add_argument("--j", type=int, default=2, help="threads for every method")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "work", help="work folder (sets, runs, JSON)")
    parser.add_argument("--relion-iter", type=int, default=None,
                        help="RELION iterations for every set (default: 25, 3 for 'large'); "
                             "fewer than 25 are extrapolated in time")
    parser.add_argument("--skip", default="", help=f"comma list of methods not to run: {', '.join(SKIPPABLE)}")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR,
                        help="where results.md and results.png go")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(SKIPPABLE):
        parser.error(f"--skip: unknown {sorted(args.skip - set(SKIPPABLE))}; choose from {', '.join(SKIPPABLE)}")
    try:
        args.bench_sets = bl.parse_sets(args.sets)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def fresh_prefix(folder: Path) -> Path:
    """An empty run folder (a previous run's outputs are removed) and the prefix ``folder/run``."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder / "run"


def run_ours(sim, bench_set: bl.BenchSet, method: str, extra: list[str], args) -> bl.Row:
    folder = args.out / bench_set.name / method.replace(" ", "").replace("--", "_")
    prefix = fresh_prefix(folder)
    commit = bl.git_commit()
    measured = bl.run_measured(bl.cryo_drvae_command(sim, prefix, args.j, extra), sim.out_dir,
                               folder / "stdout.log", args.j)
    true, pred = bl.read_labels(Path(f"{prefix}_data.star"), sim.truth_path)
    return bl.score_row(bench_set.name, method, true, pred, measured, commit,
                        Path(f"{prefix}_class_averages.mrcs"))


def run_relion(sim, bench_set: bl.BenchSet, args) -> bl.Row:
    n_iter = args.relion_iter or bench_set.relion_iter
    prefix = fresh_prefix(args.out / bench_set.name / "relion")
    measured = bl.run_measured(bl.relion_command(sim, prefix, args.j, n_iter), sim.out_dir,
                               prefix.parent / "stdout.log", args.j)
    measured = bl.extrapolate_relion(measured, prefix, n_iter)
    data_star, classes = bl.relion_outputs(prefix, n_iter)
    true, pred = bl.read_labels(data_star, sim.truth_path)
    return bl.score_row(bench_set.name, "RELION 3.1.3", true, pred, measured, "relion-3.1.3", classes)


def run_oracle(sim, bench_set: bl.BenchSet, args) -> bl.Row:
    commit = bl.git_commit()
    wall, cpu = time.perf_counter(), time.process_time()
    pred, info = bl.oracle_labels(sim, args.j)
    measured = bl.Measurement(time.perf_counter() - wall, time.process_time() - cpu, None,
                              f"true templates, fitted amplitude {info['scale']:.3g}")
    return bl.score_row(bench_set.name, "oracle", sim.labels, pred, measured, commit)


def write_reports(results: dict, args) -> None:
    rows = bl.rows_of(results)
    templates = {}
    for name in dict.fromkeys(r.set for r in rows):
        sim_dirs = sorted((args.out / "sims").glob(f"{name}-{bl.config_key(bl.SETS[name].sim)}"))
        if name in bl.SETS and sim_dirs:
            templates[name] = bl.read_stack(sim_dirs[0] / "templates.mrcs")
    text = bl.results_markdown(rows, bl.machine_line(), results["commands"])
    (args.results_dir / "results.md").write_text(text)
    if any(r.averages for r in rows):
        bl.plot_results(rows, templates, args.results_dir / "results.png")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    args.out = args.out.resolve()
    results_path = args.out / "results.json"
    command = "python bench/run_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results = bl.record(results_path, command=command)
    started = time.perf_counter()
    for bench_set in args.bench_sets:
        sim = bl.simulate_cached(bench_set, args.out)
        methods = []
        if "cryo-drvae" not in args.skip:
            methods.append(("cryo-drvae", lambda: run_ours(sim, bench_set, "cryo-drvae", [], args)))
        if "oracle" not in args.skip:
            methods.append(("oracle", lambda: run_oracle(sim, bench_set, args)))
        if "relion" not in args.skip:
            methods.append(("RELION 3.1.3", lambda: run_relion(sim, bench_set, args)))
        if "ablations" not in args.skip:
            for method, extra in ((m, ABLATIONS[m]) for m in bench_set.ablations):
                methods.append((method, lambda m=method, e=extra: run_ours(sim, bench_set, m, e, args)))
        for method, job in methods:
            logger.info("== %s: %s", bench_set.name, method)
            try:
                row = job()
            except bl.BenchError as exc:
                logger.error("%s / %s failed: %s", bench_set.name, method, exc)
                continue
            logger.info("%s / %s: accuracy %.3f, wall %.0f s", row.set, row.method, row.accuracy, row.wall_s)
            results = bl.record(results_path, row)
            write_reports(results, args)
    rows = bl.rows_of(results)
    print(bl.markdown_table(rows))
    print()
    print("\n".join(bl.summary_lines(rows)))
    print(f"\nmachine: {bl.machine_line()}\nbench time this call: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
