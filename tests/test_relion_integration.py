"""The External job against the real RELION 3.1.3 binaries (relion_pipeliner, relion_refine, ...).

Skipped, loudly, when RELION is not installed: run ``make install-relion``
(``scripts/install_relion.sh``). Uses a tiny particle set (3 chiral shapes x 15, 32 px) and the
real ``cryo_drvae.pipeline.run`` with 2 short rounds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

sys.path.insert(0, str(Path(__file__).parent))
from relion_helpers import (circular_mask, make_particle_set, relion313_external_argv,  # noqa: E402
                            run_env, stack_correlation, without_rotational_average)

RELION_MISSING = ("RELION 3.1.3 is NOT installed (relion_refine not on PATH): the RELION integration "
                  "tests did NOT run. Install it with `make install-relion` (scripts/install_relion.sh)")
pytestmark = [pytest.mark.relion, pytest.mark.skipif(shutil.which("relion_refine") is None, reason=RELION_MISSING)]

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / ".venv" / "bin" / "cryo-drvae-relion"
APIX, BOX, K = 3.0, 32, 3
# parameter pairs as typed in the External job form; short training for a test
PARAMS = [("K", str(K)), ("iter", "2"), ("particle_diameter", "84"), ("use_ctf", "0"),
          ("epochs_initial", "3"), ("epochs_per_round", "1"), ("seed", "1")]
EMPTY_PIPELINE = "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n"


def _pipeline_run_available() -> bool:
    """False only while cryo_drvae/pipeline.py does not exist; a broken import must fail the tests."""
    import importlib.util
    return importlib.util.find_spec("cryo_drvae.pipeline") is not None


def _wrapper_exe() -> str:
    if not _pipeline_run_available():
        pytest.skip("cryo_drvae/pipeline.py does not exist yet: RELION integration tests of the classifier NOT run")
    return str(WRAPPER) if WRAPPER.exists() else shutil.which("cryo-drvae-relion")


def relion(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=run_env(), timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def new_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "default_pipeline.star").write_text(EMPTY_PIPELINE)   # as the GUI makes for a new project
    return root


def add_and_run_external(project: Path, fn_exe: str, in_parts: str, params, threads: int = 1,
                         other_args: str = "") -> str:
    """Schedule an External job with relion_pipeliner --addJob and run it (--RunJobs); return its folder."""
    options = [f"fn_exe == {fn_exe}", f"in_part == {in_parts}", f"nr_threads == {threads}",
               f"other_args == {other_args}"]
    for i, (label, value) in enumerate(params, start=1):
        options += [f"param{i}_label == {label}", f"param{i}_value == {value}"]
    relion("relion_pipeliner", "--addJob", "External", "--addJobOptions", ";".join(options), cwd=project)
    job = sorted(p for p in (project / "External").iterdir() if p.is_dir())[-1]
    job_name = f"External/{job.name}/"
    relion("relion_pipeliner", "--RunJobs", job_name, "--sec_wait_after", "0", cwd=project, timeout=170)
    return job_name


def pipeline_tables(project: Path) -> dict:
    return starfile.read(project / "default_pipeline.star", always_dict=True)


@pytest.fixture(scope="module")
def our_run(tmp_path_factory):
    """One cryo-drvae External job run by relion_pipeliner in a fresh RELION project."""
    exe = _wrapper_exe()
    project = new_project(tmp_path_factory.mktemp("relion_project"))
    parts = make_particle_set(project / "Extract" / "job002", n_classes=K, n_per_class=15, box=BOX,
                              pixel_size=APIX, noise_sd=0.3, seed=3)
    in_parts = str(parts.star.relative_to(project))
    # the image names must be project-relative, as after RELION's Extract
    text = parts.star.read_text().replace(f"{project}/", "")
    parts.star.write_text(text)
    start = time.time()
    job = add_and_run_external(project, exe, in_parts, PARAMS)
    return {"project": project, "job": job, "parts": parts, "seconds": time.time() - start,
            "prefix": f"{job}run_it002"}


# ---- RELION's own command line and the pipeline ------------------------------------------------

def test_relion_313_passes_the_argv_our_parser_is_tested_with(tmp_path):
    """relion_pipeliner's real External command equals relion_helpers.relion313_external_argv."""
    project = new_project(tmp_path / "p")
    dump = project / "relion_argv_dump.py"          # 'relion_' in the name -> --pipeline_control
    dump.write_text(f"#!{sys.executable}\nimport sys, json, os\n"
                    "o = sys.argv[sys.argv.index('--o') + 1]\n"
                    "json.dump(sys.argv[1:], open(os.path.join(o, 'argv.json'), 'w'))\n"
                    "open(os.path.join(o, 'RELION_JOB_EXIT_SUCCESS'), 'w').close()\n")
    dump.chmod(0o755)
    (project / "Extract/job002").mkdir(parents=True)
    (project / "Extract/job002/particles.star").write_text("data_\n")   # the scheduler waits for inputs
    params = [("K", "50"), ("continue", ""), ("", "7"), ("gpu", "0,1")]
    job = add_and_run_external(project, str(dump), "Extract/job002/particles.star", params, threads=4,
                               other_args="--seed 3 --extra 1")
    import json
    got = json.loads((project / job / "argv.json").read_text())
    assert got == relion313_external_argv(str(dump), job, in_parts="Extract/job002/particles.star",
                                          params=params, nr_threads=4, other_args="--seed 3 --extra 1")
    assert got[got.index("--continue") + 1] == "--gpu" and got[-2:] == ["--pipeline_control", job]


def test_pipeliner_registers_our_job_and_output_nodes(our_run):
    project, job, prefix = our_run["project"], our_run["job"], our_run["prefix"]
    assert (project / job / "RELION_JOB_EXIT_SUCCESS").exists(), (project / job / "run.err").read_text()
    tables = pipeline_tables(project)
    procs = tables["pipeline_processes"].set_index("rlnPipeLineProcessName")
    assert procs.loc[job, "rlnPipeLineProcessStatus"] == 2          # Succeeded
    nodes = dict(zip(tables["pipeline_nodes"]["rlnPipeLineNodeName"], tables["pipeline_nodes"]["rlnPipeLineNodeType"]))
    assert nodes[f"{prefix}_data.star"] == 3 and nodes[f"{prefix}_model.star"] == 8
    assert nodes[f"{prefix}_optimiser.star"] == 9 and nodes[f"{prefix}_class_averages.star"] == 5
    for code, suffix in ((3, "_data.star"), (8, "_model.star"), (9, "_optimiser.star")):
        assert (project / ".Nodes" / str(code) / f"{prefix}{suffix}").exists()
    out = (project / job / "run.out").read_text()
    assert "\x1b[" not in out and "\r" not in out, "terminal control codes in run.out"


def test_relion_reads_our_optimiser_without_unknown_labels(our_run):
    project, prefix = our_run["project"], our_run["prefix"]
    proc = relion("relion_star_handler", "--i", f"{prefix}_optimiser.star", "--o", "opt_copy.star", cwd=project)
    assert "unknown label" not in proc.stdout + proc.stderr


def test_star_handler_selects_exactly_our_class_2(our_run):
    project, prefix = our_run["project"], our_run["prefix"]
    relion("relion_star_handler", "--i", f"{prefix}_data.star", "--o", "sel.star",
           "--select", "rlnClassNumber", "--minval", "2", "--maxval", "2", cwd=project)
    ours = starfile.read(project / f"{prefix}_data.star", always_dict=True)["particles"]
    expected = sorted(ours.loc[ours["rlnClassNumber"] == 2, "rlnImageName"])
    assert expected, "our run put no particle in class 2"
    selected = starfile.read(project / "sel.star", always_dict=True)["particles"]
    assert sorted(selected["rlnImageName"]) == expected


def test_image_handler_reads_our_class_averages(our_run):
    project, prefix = our_run["project"], our_run["prefix"]
    proc = relion("relion_image_handler", "--i", f"{prefix}_class_averages.mrcs", "--stats", cwd=project)
    lines = [line for line in proc.stdout.splitlines() if "stddev=" in line]
    assert len(lines) == K
    for k, line in enumerate(lines, start=1):
        assert line.startswith(f"{k:06d}@") and f"{BOX} x {BOX} x 1 x 1" in line and "angpix = 3" in line
        std = float(re.search(r"stddev=\s*(\S+)", line).group(1))
        assert np.isfinite(std) and std > 0


def test_relion_refine_runs_one_iteration_on_our_output(our_run):
    project, prefix = our_run["project"], our_run["prefix"]
    (project / "Class2D" / "job099").mkdir(parents=True)
    relion("relion_refine", "--i", f"{prefix}_data.star", "--o", "Class2D/job099/run", "--K", "2", "--iter", "1",
           "--tau2_fudge", "2", "--particle_diameter", "84", "--ctf", "--psi_step", "12", "--offset_range", "3",
           "--offset_step", "2", "--j", "1", "--dont_check_norm", "--pipeline_control", "Class2D/job099/",
           cwd=project, timeout=170)
    assert (project / "Class2D/job099/RELION_JOB_EXIT_SUCCESS").exists()
    out = starfile.read(project / "Class2D/job099/run_it001_data.star", always_dict=True)["particles"]
    assert len(out) == 3 * 15


# ---- RELION's sign conventions for psi and origins ---------------------------------------------

def _aligned_class_means(project: Path, data_star: str, flip_psi: bool) -> tuple[dict, dict]:
    blocks = starfile.read(project / data_star, always_dict=True)
    parts = blocks["particles"].copy()
    if flip_psi:
        parts["rlnAnglePsi"] = -parts["rlnAnglePsi"]
    starfile.write({"optics": blocks["optics"], "particles": parts}, project / "for_align.star", overwrite=True)
    relion("relion_stack_create", "--i", "for_align.star", "--o", "aligned", "--apply_transformation", cwd=project)
    aligned = mrcfile.read(project / "aligned.mrcs")
    classes = parts["rlnClassNumber"].to_numpy()
    return {k: aligned[classes == k].mean(axis=0) for k in np.unique(classes)}, \
           {k: int((classes == k).sum()) for k in np.unique(classes)}


def test_relion_convention_with_known_poses(tmp_path):
    """Independent of our classifier: particle = template turned by +theta (counter-clockwise, y = row
    index up) then shifted by d px  <=>  RELION rlnAnglePsi = -theta, rlnOrigin{X,Y}Angst = -d * apix."""
    project = new_project(tmp_path / "p")
    parts = make_particle_set(project, n_classes=3, n_per_class=6, box=BOX, pixel_size=APIX,
                              noise_sd=0.05, max_shift_px=3, seed=5)
    blocks = starfile.read(parts.star, always_dict=True)
    mask = circular_mask(BOX)
    scores = {}
    for psi_sign in (-1, 1):
        p = blocks["particles"].copy()
        p["rlnAnglePsi"] = psi_sign * parts.angles_deg
        p["rlnOriginXAngst"] = -parts.shifts_px[:, 0] * APIX
        p["rlnOriginYAngst"] = -parts.shifts_px[:, 1] * APIX
        starfile.write({"optics": blocks["optics"], "particles": p}, project / "poses.star", overwrite=True)
        relion("relion_stack_create", "--i", "poses.star", "--o", "aligned", "--apply_transformation", cwd=project)
        aligned = mrcfile.read(project / "aligned.mrcs")
        scores[psi_sign] = min(stack_correlation(aligned[i], parts.templates[parts.labels[i] - 1], mask)
                               for i in range(len(aligned)))
    assert scores[-1] > 0.95 and scores[1] < 0.7, scores


def test_our_psi_and_origins_follow_relion_convention(our_run):
    """relion_stack_create --apply_transformation with our psi/origins must reproduce our class averages,
    and must not with the psi sign flipped."""
    project, prefix = our_run["project"], our_run["prefix"]
    averages = mrcfile.read(project / f"{prefix}_class_averages.mrcs")
    psi = starfile.read(project / f"{prefix}_data.star", always_dict=True)["particles"][["rlnClassNumber", "rlnAnglePsi"]]
    mask = circular_mask(BOX, 0.4)
    means, counts = _aligned_class_means(project, f"{prefix}_data.star", flip_psi=False)
    flipped, _ = _aligned_class_means(project, f"{prefix}_data.star", flip_psi=True)
    sign_tested = 0
    for k, mean in means.items():
        if counts[k] < 5:
            continue
        right = stack_correlation(mean, averages[k - 1], mask)
        assert right > 0.8, f"class {k}: particles aligned by RELION vs our average r={right:.2f}"
        # flipping psi only changes particles whose psi is not 0 or 180 degrees
        class_psi = np.deg2rad(psi.loc[psi["rlnClassNumber"] == k, "rlnAnglePsi"].to_numpy())
        if np.mean(np.abs(np.sin(class_psi)) > 0.5) < 0.5:
            continue
        # the rotationally symmetric part matches whatever the angles; compare the rest
        reference = without_rotational_average(averages[k - 1])
        right_r = stack_correlation(without_rotational_average(mean), reference, mask)
        wrong_r = stack_correlation(without_rotational_average(flipped[k]), reference, mask)
        assert wrong_r < right_r - 0.3, f"class {k}: psi flipped still matches (r={right_r:.2f}, flipped {wrong_r:.2f})"
        sign_tested += 1
    assert sign_tested >= 1, "no class had psi values that a sign flip changes: the psi sign was not tested"


# ---- input formats ------------------------------------------------------------------------

def _run_wrapper_as_relion_does(project: Path, job: str, in_parts: str, params=PARAMS) -> subprocess.CompletedProcess:
    """The command RELION 3.1.3's External job runs (checked above), with its run.out/run.err."""
    (project / job).mkdir(parents=True, exist_ok=True)
    argv = [_wrapper_exe()] + relion313_external_argv("x", job, in_parts=in_parts, params=params, nr_threads=1)
    with open(project / job / "run.out", "a") as out, open(project / job / "run.err", "a") as err:
        return subprocess.run(argv, cwd=project, stdout=out, stderr=err, env=run_env(), timeout=170)


@pytest.mark.parametrize("converted", [False, True], ids=["relion30_star", "relion31_from_convert_star"])
def test_relion30_and_converted_stars_classify(tmp_path, converted):
    project = new_project(tmp_path / "p")
    parts = make_particle_set(project, n_classes=K, n_per_class=10, box=BOX, pixel_size=APIX, seed=7,
                              relion30=True, star_name="particles30.star")
    parts.star.write_text(parts.star.read_text().replace(f"{project}/", ""))
    in_parts = "particles30.star"
    if converted:
        relion("relion_convert_star", "--i", in_parts, "--o", "particles31.star", cwd=project)
        assert "data_optics" in (project / "particles31.star").read_text()
        in_parts = "particles31.star"
    job = "External/job005/"
    proc = _run_wrapper_as_relion_does(project, job, in_parts)
    assert proc.returncode == 0 and (project / job / "RELION_JOB_EXIT_SUCCESS").exists(), \
        (project / job / "run.err").read_text()
    data = starfile.read(project / f"{job}run_it002_data.star", always_dict=True)
    assert set(data) >= {"optics", "particles"}
    assert float(data["optics"]["rlnImagePixelSize"].iloc[0]) == pytest.approx(APIX)
    assert len(data["particles"]) == 3 * 10 and data["particles"]["rlnClassNumber"].between(1, K).all()
    # and RELION reads it back
    relion("relion_star_handler", "--i", f"{job}run_it002_data.star", "--o", "check.star", cwd=project)


# ---- abort --------------------------------------------------------------------------------

def test_abort_file_stops_a_real_run(tmp_path):
    project = new_project(tmp_path / "p")
    make_particle_set(project, n_classes=K, n_per_class=15, box=BOX, pixel_size=APIX, seed=9)
    (project / "particles.star").write_text((project / "particles.star").read_text().replace(f"{project}/", ""))
    job = project / "External" / "job007"
    job.mkdir(parents=True)
    # tolerance 0: all 30 rounds run, so the job is still busy when the abort file appears
    params = [("K", str(K)), ("iter", "30"), ("tolerance", "0"), ("epochs_initial", "500"), ("epochs_per_round", "50"),
              ("use_ctf", "0")]
    argv = [_wrapper_exe()] + relion313_external_argv("x", "External/job007/", in_parts="particles.star",
                                                        params=params, nr_threads=1)
    with open(job / "run.out", "w") as out, open(job / "run.err", "w") as err:
        proc = subprocess.Popen(argv, cwd=project, stdout=out, stderr=err, env=run_env())
        deadline = time.time() + 60
        while "configuration" not in (job / "run.out").read_text() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)                                      # the pipeline is now reading/training
        assert proc.poll() is None, "the run ended before the abort could be tested"
        (job / "RELION_JOB_ABORT_NOW").touch()
        aborted_at = time.time()
        rc = proc.wait(timeout=60)
    assert rc == 2 and time.time() - aborted_at < 30
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not list(job.glob("*_data.star")) and not list(job.glob("*_model.star"))
