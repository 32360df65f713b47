"""Run cryo-drvae on bad inputs and faults as a careful user would, and print a table.

Each case gets a fresh copy of a 200-particle, 4-class, 32 px simulated set and runs
``python -m cryo_drvae classify`` in a subprocess (faults such as a full disk or SIGTERM are
injected by a few lines run before the CLI). The table shows the exit status, the last line
printed, whether outputs (final or temporary) or scratch files were left, whether the input
was untouched and, for runs that should succeed, the accuracy against the simulated truth.

    python scripts/reliability_matrix.py [--keep DIR]        # make reliability
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryo_drvae.errors import InputFileError  # noqa: E402
from cryo_drvae.evaluate import evaluate_run  # noqa: E402
from cryo_drvae.guard import FINISHED_SUFFIXES  # noqa: E402
from cryo_drvae.simulate import SimulationConfig, simulate_dataset  # noqa: E402

BASE = ["--K", "4", "--iter", "3", "--j", "1"]
SMALL_FS: Path | None = None

# Faults injected before the CLI starts (run with python -c).
PRELUDES = {
    "scratch_small": "import os\nclass _S: f_bavail, f_frsize = 10, 4096\nos.statvfs = lambda p: _S()\n",
    "short_writes": ("import os\nfrom cryo_drvae import store\n_w = os.pwrite\n"
                     "store.os.pwrite = lambda fd, d, off: _w(fd, bytes(d)[:4096], off)\n"),
    "scratch_enospc": ("import os, errno\nfrom cryo_drvae import store\n_w = os.pwrite\n_n = [0]\n"
                       "def _pw(fd, d, off):\n    _n[0] += 1\n"
                       "    if _n[0] > 1: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
                       "    return _w(fd, d, off)\nstore.os.pwrite = _pw\n"),
    "output_enospc": ("import os, errno\nfrom cryo_drvae import star_io\n_l = star_io._write_loop\n"
                      "def _wl(h, b):\n    if len(b) < 100: return _l(h, b)\n    h.write('loop_')\n"
                      "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
                      "star_io._write_loop = _wl\n"),
    "sigterm": ("import os, signal\nfrom cryo_drvae import checkpoint\n_s = checkpoint.save_round_state\n"
                "def _save(cfg, state, *a, **k):\n    _s(cfg, state, *a, **k)\n"
                "    if state.round == 1: os.kill(os.getpid(), signal.SIGTERM)\n"
                "checkpoint.save_round_state = _save\n"),
    "stop_round1": ("from cryo_drvae import checkpoint\n_s = checkpoint.save_round_state\n"
                    "def _save(cfg, state, *a, **k):\n    _s(cfg, state, *a, **k)\n"
                    "    if state.round == 1: raise KeyboardInterrupt\n"
                    "checkpoint.save_round_state = _save\n"),
}


@dataclass
class Case:
    name: str
    expect: str                                   # "ok", "refused", "warned", "interrupted"
    args: list[str] = field(default_factory=list)
    change: Callable[[Path], None] | None = None  # edits the copied set
    prelude: str | None = None
    before: list[tuple[list[str], str | None]] = field(default_factory=list)   # earlier runs (args, prelude)
    hold_lock: bool = False
    small_fs: str | None = None                   # "scratch" or "output" on the --small-fs folder


# ---- set changes ------------------------------------------------------------------------------

def _rewrite(folder: Path, change) -> None:
    for i, path in enumerate(sorted((folder / "Particles").glob("*.mrcs"))):
        with mrcfile.open(path) as mrc:
            data, voxel = mrc.data.copy(), mrc.voxel_size.x
        path.unlink()
        with mrcfile.new(path) as mrc:
            mrc.set_data(change(data, i))
            mrc.voxel_size = voxel


def offset(folder: Path) -> None:
    _rewrite(folder, lambda d, i: d + 5.0)


def uint16(folder: Path) -> None:
    _rewrite(folder, lambda d, i: np.round(d * 40 + 1000).astype(np.uint16))


def per_image(folder: Path) -> None:
    _rewrite(folder, lambda d, i: (d * (1 + 0.01 * np.arange(len(d)))[:, None, None]
                                   + 3.0 * np.arange(len(d))[:, None, None] + 7 * i).astype(np.float32))


def float64_as_mode2(folder: Path) -> None:
    path = sorted((folder / "Particles").glob("*.mrcs"))[0]
    raw = path.read_bytes()
    with mrcfile.open(path) as mrc:
        values = mrc.data.astype(np.float64)
    path.write_bytes(raw[:1024] + values.tobytes())


def _edit_star(folder: Path, edit) -> None:
    star = folder / "particles.star"
    blocks = starfile.read(star, always_dict=True)
    edit(blocks)
    starfile.write(blocks, star, overwrite=True)


def duplicates(folder: Path) -> None:
    _edit_star(folder, lambda b: b.__setitem__("particles", b["particles"].iloc[list(range(200)) + list(range(50))]))


def pixel_zero(folder: Path) -> None:
    _edit_star(folder, lambda b: b["optics"].__setitem__("rlnImagePixelSize", 0.0))


def other_input(folder: Path) -> None:
    simulate_dataset(SimulationConfig(n_classes=4, n_particles=200, snr=0.5, box_size=32, pixel_size=3.0,
                                      particles_per_stack=100, seed=12), folder / "other")


def other_star(folder: Path) -> Path:
    return folder / "other" / "particles.star"


CASES = [
    Case("normalised float32 stack", "ok"),
    Case("float32 stack + 5", "ok", change=offset),
    Case("uint16 stack (x40 + 1000)", "ok", change=uint16),
    Case("per-image offsets and gains", "ok", change=per_image),
    Case("float64 data under a mode-2 header", "refused", change=float64_as_mode2),
    Case("scratch disk too small (40 kB free)", "refused", prelude="scratch_small"),
    Case("scratch pwrite writes 4 kB per call", "ok", prelude="short_writes"),
    Case("scratch disk fills during the writes", "refused", prelude="scratch_enospc"),
    Case("output disk full at _data.star", "refused", prelude="output_enospc"),
    Case("real full disk: scratch on the small filesystem", "refused", small_fs="scratch"),
    Case("real full disk: outputs on the small filesystem", "refused", small_fs="output"),
    Case("... then --continue after freeing space", "ok", args=["--continue"],
         before=[([], "output_enospc")]),
    Case("existing outputs, no --overwrite", "refused", args=["--seed", "2"], before=[([], None)]),
    Case("existing outputs, --overwrite", "ok", args=["--seed", "2", "--overwrite"], before=[([], None)]),
    Case("second run while the prefix is locked", "refused", hold_lock=True),
    Case("checkpoint left, no --continue", "refused", before=[([], "stop_round1")]),
    Case("--continue with --seed 1", "refused", args=["--continue", "--seed", "1"], before=[([], "stop_round1")]),
    Case("--continue with --no_ctf", "refused", args=["--continue", "--no_ctf"], before=[([], "stop_round1")]),
    Case("--continue with --balance 0.5", "refused", args=["--continue", "--balance", "0.5"],
         before=[([], "stop_round1")]),
    Case("--continue with --psi_step 15", "refused", args=["--continue", "--psi_step", "15"],
         before=[([], "stop_round1")]),
    Case("--continue with another --i", "refused", args=["--continue", "OTHER_INPUT"], change=other_input,
         before=[([], "stop_round1")]),
    Case("--continue with --iter 5 (allowed)", "ok", args=["--continue", "--iter", "5"],
         before=[([], "stop_round1")]),
    Case("SIGTERM after round 1", "interrupted", prelude="sigterm"),
    Case("... then --continue", "ok", args=["--continue"], before=[([], "sigterm")]),
    Case("50 duplicate rows", "warned", change=duplicates),
    Case("--particle_diameter 1", "refused", args=["--particle_diameter", "1"]),
    Case("--particle_diameter 1000 (96 Å box)", "refused", args=["--particle_diameter", "1000"]),
    Case("--particle_diameter 20 (96 Å box)", "warned", args=["--particle_diameter", "20"]),
    Case("rlnImagePixelSize 0 in data_optics", "refused", change=pixel_zero),
    Case("--balance 3", "refused", args=["--balance", "3"]),
]


# ---- running ----------------------------------------------------------------------------------

def digest(folder: Path, skip_log: bool = False) -> str:
    """Hash of every file below ``folder`` (the run log left out if ``skip_log``: a refused
    ``--continue`` records its attempt there)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and "other" not in p.parts and not (skip_log and p.name.endswith("_run.log")):
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def cli(star: Path, prefix: Path, args: list[str], prelude: str | None) -> subprocess.CompletedProcess:
    command_star = str(star.parent / "other" / "particles.star") if "OTHER_INPUT" in args else str(star)
    args = [a for a in args if a != "OTHER_INPUT"]
    argv = ["classify", "--i", command_star, "--o", str(prefix), *BASE, *args]
    code = (PRELUDES[prelude] if prelude else "") + "import sys\nfrom cryo_drvae.cli import main\n" \
        "sys.argv = ['cryo-drvae'] + sys.argv[1:]\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def leftovers(prefix: Path) -> list[str]:
    folder = prefix.parent
    if not folder.exists():
        return []
    names = [p.name for p in folder.iterdir()]
    return sorted(n for n in names if ".tmp" in n or n.endswith("_scratch") or n.endswith(".lock")
                  or any(n == prefix.name + s for s in FINISHED_SUFFIXES))


def run_case(case: Case, source: Path, root: Path) -> dict[str, str]:
    folder = root / re.sub(r"[^A-Za-z0-9]+", "_", case.name).strip("_")
    shutil.copytree(source, folder / "set")
    data = folder / "set"
    if case.change:
        case.change(data)
    prefix = folder / "out" / "run"
    extra: list[str] = []
    if case.small_fs == "output":
        prefix = SMALL_FS / folder.name / "run"
        extra = ["--scratch_dir", str(folder / "scratch")]
    elif case.small_fs == "scratch":
        extra = ["--scratch_dir", str(SMALL_FS / folder.name)]
    for args, prelude in case.before:
        cli(data / "particles.star", prefix, args, prelude)
    before_out = digest(prefix.parent, skip_log=True) if prefix.parent.exists() else None
    before_in = digest(data)
    holder = None
    if case.hold_lock:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom cryo_drvae.guard import prefix_lock\n"
                                   f"with prefix_lock({str(prefix)!r}):\n    print('locked', flush=True)\n"
                                   "    time.sleep(120)"], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        holder.stdout.readline()
    started = time.perf_counter()
    try:
        done = cli(data / "particles.star", prefix, case.args + extra, case.prelude)
    finally:
        if holder:                       # Ctrl-C: the holder releases and removes its lock
            holder.send_signal(signal.SIGINT)
            holder.wait(30)
    wall = time.perf_counter() - started
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    warnings = [ln for ln in lines if " WARNING " in ln]
    last = lines[-1] if lines else ""
    if done.returncode == 0:
        outcome = "ok" + (f", warned: {warnings[0].split(' WARNING ', 1)[1]}" if warnings else "")
        try:
            accuracy = f"{evaluate_run(data / 'truth.csv', f'{prefix}_data.star').accuracy:.3f}"
        except InputFileError:           # evaluate refuses repeated rows: there is no single truth
            accuracy = "n/a"
    else:
        outcome = last
        accuracy = ""
    got = ("warned" if warnings and done.returncode == 0 else "ok") if done.returncode == 0 else \
        ("interrupted" if done.returncode in (130, 143) else "refused")
    left = leftovers(prefix)
    if got in ("ok", "warned") or case.before:   # outputs of this or an earlier finished run may be there
        left = [n for n in left if ".tmp" in n or n.endswith(("_scratch", ".lock"))]
    if case.small_fs:
        left += [p.name for p in (SMALL_FS / folder.name).rglob("*.f32")]    # scratch left there?
        shutil.rmtree(SMALL_FS / folder.name, ignore_errors=True)
    if case.before and got not in ("ok", "warned") and before_out is not None:
        same = digest(prefix.parent, skip_log=True) == before_out
        partial = "none (earlier files unchanged)" if same and not left else "CHANGED " + ", ".join(left)
    else:
        partial = ", ".join(left) or "none"
    one_line = "Traceback" not in done.stderr
    return {"case": case.name, "expected": case.expect, "got": got, "exit": str(done.returncode),
            "one line": "yes" if one_line else "NO (traceback)", "left behind": partial,
            "input untouched": "yes" if digest(data) == before_in else "NO",
            "accuracy": accuracy, "s": f"{wall:.0f}", "message": _short(outcome.replace(f"{folder}/", ""))}


def _short(text: str, width: int = 260) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= width else text[:width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="keep the case folders here (default: a temporary folder)")
    parser.add_argument("--only", help="run only cases whose name contains this text")
    parser.add_argument("--small-fs", type=Path,
                        help="an empty folder on a ~96 kB filesystem (e.g. `mount -t tmpfs -o size=96k tmpfs "
                             "DIR`) for two real full-disk cases; without it they are left out")
    args = parser.parse_args()
    global SMALL_FS
    SMALL_FS = args.small_fs
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cryo_drvae_matrix_"))
    root.mkdir(parents=True, exist_ok=True)
    source = root / "_source"
    if not source.exists():
        simulate_dataset(SimulationConfig(n_classes=4, n_particles=200, snr=0.5, box_size=32, pixel_size=3.0,
                                          particles_per_stack=100, seed=11), source)
    rows = []
    cases = [c for c in CASES if (not args.only or args.only in c.name) and (SMALL_FS or not c.small_fs)]
    for case in cases:
        row = run_case(case, source, root)
        rows.append(row)
        print(f"[{len(rows)}/{len(cases)}] {row['case']}: {row['got']} (exit {row['exit']})", file=sys.stderr,
              flush=True)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")
    bad = [r for r in rows if r["got"] != r["expected"] or r["one line"] != "yes" or r["input untouched"] != "yes"
           or r["left behind"] not in ("none", "none (earlier files unchanged)")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} cases as expected")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
