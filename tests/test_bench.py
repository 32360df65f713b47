"""The benchmark's own pieces (scoring, oracle, tables) on a tiny simulated set; no RELION run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import benchlib as bl  # noqa: E402
from cryo_drvae.simulate import SimulationConfig, simulate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory):
    """2 views x 30 particles, box 32 at 4 Å/px, high SNR."""
    cfg = SimulationConfig(n_classes=2, n_particles=60, snr=1.0, box_size=32, pixel_size=4.0,
                           max_shift_px=2.0, particles_per_stack=60, seed=5)
    return simulate_dataset(cfg, tmp_path_factory.mktemp("tiny"))


def write_data_star(sim, out: Path, classes: np.ndarray, zero_padded: bool = True) -> Path:
    """A classification's data STAR for ``sim``: the input particles plus ``rlnClassNumber``,
    rows reversed (as a program may reorder them) and optionally without the slice zero padding."""
    blocks = starfile.read(sim.star_path, always_dict=True)
    parts = blocks["particles"].copy()
    parts["rlnClassNumber"] = classes
    if not zero_padded:
        parts["rlnImageName"] = [f"{int(n.split('@')[0])}@{n.split('@')[1]}" for n in parts["rlnImageName"]]
    starfile.write({"optics": blocks["optics"], "particles": parts.iloc[::-1]}, out, overwrite=True)
    return out


def test_oracle_recovers_true_classes_on_a_clean_set(tiny_set):
    labels, info = bl.oracle_labels(tiny_set, threads=2)
    scores = bl.score_row("tiny", "oracle", tiny_set.labels, labels, bl.Measurement(1, 1, None), "x")
    assert labels.shape == tiny_set.labels.shape
    assert scores.accuracy >= 0.95
    assert info["scale"] > 0


def test_fake_method_is_scored_exactly(tiny_set, tmp_path):
    true = tiny_set.labels
    pred = 3 - true                       # classes swapped: still a perfect classification
    wrong = np.flatnonzero(true == 1)[:6]  # 6 of 60 moved to the other class: 54/60 right
    pred[wrong] = 1
    star = write_data_star(tiny_set, tmp_path / "run_data.star", pred, zero_padded=False)
    read_true, read_pred = bl.read_labels(star, tiny_set.truth_path)
    np.testing.assert_array_equal(read_true, true)
    np.testing.assert_array_equal(read_pred, pred)
    row = bl.score_row("tiny", "fake", read_true, read_pred, bl.Measurement(12.0, 20.0, 300.0), "abc")
    assert row.accuracy == pytest.approx(54 / 60)
    n1 = int(np.sum(pred == 1))
    assert (row.smallest_class, row.largest_class) == (min(n1, 60 - n1), max(n1, 60 - n1))
    assert row.class_order == [1, 0]      # true class 1 is predicted class 2 (0-based 1)
    perfect = bl.score_row("tiny", "fake", true, 3 - true, bl.Measurement(1, 1, None), "abc")
    assert (perfect.accuracy, perfect.nmi, perfect.ari) == (1.0, pytest.approx(1.0), pytest.approx(1.0))


def test_read_labels_names_the_missing_particles(tiny_set, tmp_path):
    star = write_data_star(tiny_set, tmp_path / "run_data.star", tiny_set.labels)
    blocks = starfile.read(star, always_dict=True)
    starfile.write({"optics": blocks["optics"], "particles": blocks["particles"].iloc[5:]}, star, overwrite=True)
    with pytest.raises(bl.BenchError, match="5 particles of .*truth.csv are missing"):
        bl.read_labels(star, tiny_set.truth_path)


def test_markdown_table_rows_columns_and_summary():
    m = bl.Measurement
    rows = [bl.score_row("easy", "cryo-drvae", np.array([1, 1, 2, 2]), np.array([2, 2, 1, 1]), m(10, 15, 500), "c1"),
            bl.score_row("easy", "RELION 3.1.3", np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]), m(100, 190, 80),
                         "relion-3.1.3"),
            bl.score_row("easy", "oracle", np.array([1, 1, 2, 2]), np.array([1, 1, 2, 2]), m(2, 3, None), "c1")]
    lines = bl.markdown_table(rows).splitlines()
    assert len(lines) == 2 + 3
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bl.TABLE_COLUMNS)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(c) == len(bl.TABLE_COLUMNS) for c in cells)
    assert cells[0][:6] == ["easy", "cryo-drvae", "1.000", "1.000", "1.000", "2/2"]
    assert cells[1][2] == "0.750" and cells[1][5] == "1/3" and cells[1][6:9] == ["100", "190", "80"]
    assert cells[2][8] == "–"
    summary = bl.summary_lines(rows)
    assert summary == ["easy: accuracy gap to oracle +0.000 (1.000 vs 1.000) vs RELION accuracy +0.250 "
                       "wall speed-up x10.0 CPU speed-up x12.7"]
    text = bl.results_markdown(rows, "CPU X, 2 cores", ["python bench/run_bench.py --sets easy"])
    assert "Machine: CPU X, 2 cores" in text and "--sets easy" in text and lines[0] in text


def test_results_store_replaces_rows_of_the_same_set_and_method(tmp_path):
    m = bl.Measurement(1, 1, None)
    path = tmp_path / "results.json"
    bl.record(path, command="python bench/run_bench.py --sets hard")
    for pred in (np.array([1, 2, 2, 2]), np.array([1, 1, 2, 2])):
        bl.record(path, bl.score_row("hard", "oracle", np.array([1, 1, 2, 2]), pred, m, "c"))
    bl.record(path, bl.score_row("easy", "cryo-drvae", np.array([1, 1, 2, 2]), np.array([1, 1, 2, 2]), m, "c"),
              command="python bench/run_bench.py --sets hard")
    stored = bl.load_results(path)
    assert stored["commands"] == ["python bench/run_bench.py --sets hard"]
    rows = bl.rows_of(stored)
    assert [(r.set, r.method, r.accuracy) for r in rows] == [("easy", "cryo-drvae", 1.0), ("hard", "oracle", 1.0)]


def test_relion_time_is_extrapolated_from_iteration_file_times(tmp_path):
    import os
    prefix = tmp_path / "run"
    for it, t in ((0, 1000.0), (3, 1030.0)):
        path = Path(f"{prefix}_it{it:03d}_model.star")
        path.write_text("")
        os.utime(path, (t, t))
    measured = bl.Measurement(wall_s=40.0, cpu_s=80.0, peak_rss_mb=100.0)
    out = bl.extrapolate_relion(measured, prefix, 3, 25)
    # 10 s per iteration, 10 s set-up: 10 + 25 x 10
    assert out.wall_s == pytest.approx(260.0)
    assert out.cpu_s == pytest.approx(80.0 * 260.0 / 40.0)
    assert "extrapolated" in out.note
    assert bl.extrapolate_relion(measured, prefix, 25, 25) is measured


@pytest.mark.skipif(not bl.structures_available(), reason="no ../shared structures")
def test_protein_families_come_at_three_seeds():
    """Real-protein families, each at three seeds, simulated from ../shared/data/structures."""
    assert [s.name for s in bl.parse_sets("kpr-0.01")] == ["kpr-0.01-s1", "kpr-0.01-s2", "kpr-0.01-s3"]
    proteins = bl.parse_sets("proteins")
    assert len(proteins) == 24 and all(s.sim.pdb_files for s in proteins)
    assert {bl.family_of(s.name) for s in proteins} >= {"kpr-0.05", "hvr-0.01", "kpr-imbalanced", "mix-0.02"}
    assert len({s.sim.seed for s in proteins}) == 3


def test_sets_and_relion_command_follow_the_specification():
    names = [s.name for s in bl.parse_sets("all")]
    assert names[:6] == ["easy", "standard", "hard", "hetero", "imbalanced", "large"]
    with pytest.raises(ValueError, match="choose from"):
        bl.parse_sets("easy,nope")
    std = bl.SETS["standard"]
    assert (std.sim.n_classes, std.sim.n_particles, std.sim.snr, std.ablations) == (10, 2000, 0.02, bl.BLOB_ABLATIONS)
    assert bl.SETS["large"].relion_iter == 3 and bl.SETS["imbalanced"].sim.imbalance == 12
    fake = type("S", (), {"config": std.sim})()
    cmd = bl.relion_command(fake, Path("/x/run"), 2, 25)
    joined = " ".join(cmd)
    for part in ("--ctf", "--iter 25", "--tau2_fudge 2", "--K 10", "--psi_step 12", "--offset_range 5",
                 "--offset_step 2", "--zero_mask", "--flatten_solvent", "--norm", "--scale", "--j 2",
                 "--particle_diameter 115.2", "--pool 30", "--dont_combine_weights_via_disc"):
        assert part in joined


def test_scale_benchmark_reads_rates_and_compares_sizes():
    from bench import bench_scale as bs

    log = ("10:00:01 INFO round 1/4: 100.0% of labels changed, class sizes 3-9, 2.0 s (900 particles/s; ...)\n"
           "10:00:03 INFO round 2/4: 5.0% of labels changed, class sizes 3-9, 2.0 s (1000 particles/s; ...)\n"
           "10:00:05 INFO round 3/4: 1.0% of labels changed, class sizes 3-9, 2.0 s (1100 particles/s; ...)\n"
           "10:00:06 INFO stage times (s): read 1.0, cluster 2.0, align 6.0\n")
    rate, stages = bs.parse_log(log)
    assert rate == 1000 and stages == "read 1.0, cluster 2.0, align 6.0"
    small = bs.ScaleRow(20_000, 50, 100.0, 150.0, 1000.0, 400.0, stages, 0.9, "CPU x2")
    large = bs.ScaleRow(200_000, 50, 1200.0, 1800.0, 1300.0, 360.0, stages, 0.9, "CPU x2")
    assert large.us_per_particle == pytest.approx(6000.0)
    (line,) = bs.ratios([bs.ScaleRow(2000, 10, 5, 5, 900, 999, "", 1.0, "CPU x2"), small, large])
    assert "time per particle x1.20" in line and "peak RSS x1.30" in line
    assert bs.table([small]).count("\n") == 2
    assert bs.classes_for(2000) == 10 and bs.classes_for(20_000) == 50
