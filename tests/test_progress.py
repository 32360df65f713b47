"""Progress: bars on a terminal (also one that reports no size, as under `script`), none in a pipe
(RELION's run.out); time left for the unequal steps of class growing."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from cryo_drvae.progress import WorkClock, format_seconds
from cryo_drvae.simulate import SimulationConfig, simulate_dataset
from cryo_drvae.splitting import growth_work, splits_per_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    simulate_dataset(SimulationConfig(n_classes=2, n_particles=30, snr=0.1, box_size=32, pixel_size=5.0, seed=4),
                     out)
    return out


def _classify(tiny: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cryo_drvae", "classify", "--i", str(tiny / "particles.star"),
            "--o", str(out / "run"), "--K", "2", "--iter", "2", "--j", "1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_bars_draw_on_a_terminal_that_reports_no_size(tiny, tmp_path):
    master, slave = pty.openpty()            # a fresh pty has 0 rows and 0 columns, like `script`'s
    proc = subprocess.Popen(_classify(tiny, tmp_path), stdin=slave, stdout=slave, stderr=slave, env=_env(),
                            cwd=tiny)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:                      # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "aligning:" in text and "%|" in text, text[-2000:]


@pytest.mark.slow
def test_no_bars_when_not_a_terminal(tiny, tmp_path):
    proc = subprocess.run(_classify(tiny, tmp_path), capture_output=True, text=True, env=_env(), cwd=tiny,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "%|" not in proc.stderr and "aligning:" not in proc.stderr
    assert "left" in proc.stderr                     # class growing reports its time left


def test_growth_work_follows_the_split_schedule():
    """Hand-counted schedules (one split at a time up to 15 classes, then k // 8 at once, the last
    stage capped at K): each stage costs k x its rounds (one more at k = 1), then the settling steps."""
    assert [splits_per_stage(k) for k in (1, 7, 15, 16, 23, 24, 40)] == [1, 1, 1, 2, 2, 3, 5]
    stages_20 = list(range(1, 17)) + [18, 20]
    assert growth_work(20, rounds_per_split=2, settle_rounds=3) == \
        [3.0] + [2.0 * k for k in stages_20[1:]] + [20.0] * 3
    stages_50 = list(range(1, 17)) + [18, 20, 22, 24, 27, 30, 33, 37, 41, 46, 50]
    assert growth_work(50, rounds_per_split=1, settle_rounds=0) == [2.0] + [float(k) for k in stages_50[1:]]
    assert growth_work(1, rounds_per_split=2, settle_rounds=2) == [3.0, 1.0, 1.0]


def test_work_clock_takes_the_pace_of_the_last_step(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("cryo_drvae.progress.time.perf_counter", lambda: now[0])
    clock = WorkClock([1, 3, 6])
    assert clock.seconds_left() is None
    now[0] = 102.0
    clock.step_done(0)
    assert clock.seconds_left() == pytest.approx(18.0)      # 2 s per unit, 9 units left
    now[0] = 114.0
    clock.step_done(1)
    assert clock.seconds_left() == pytest.approx(24.0)      # now 4 s per unit, 6 units left
    assert format_seconds(12.0) == "about 12 s left" and format_seconds(600) == "about 10 min left"
