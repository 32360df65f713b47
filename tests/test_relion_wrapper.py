"""Fast tests of the RELION External-job handshake (no RELION binaries, a stand-in pipeline)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryo_drvae.config import DIAMETER_FRACTION
from relion_wrapper import external_job as ej

sys.path.insert(0, str(Path(__file__).parent))
from relion_helpers import FakePipeline, FakeResult, make_particle_set, relion313_external_argv, run_env  # noqa: E402

# What a RELION 3.1.3 pipeline file looks like (written by relion_pipeliner 3.1.3 for an External job).
PIPELINE_31 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       3


# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessType #3
_rlnPipeLineProcessStatus #4
External/job002/       None           99            0


# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeType #2
Import/job001/particles.star            3
"""
# RELION 4.0 (PipeLine::write, src/pipeliner.cpp, tag 4.0.1): type labels, version still 30001.
PIPELINE_40 = """
# version 30001

data_pipeline_general

_rlnPipeLineJobCounter                       3


# version 30001

data_pipeline_processes

loop_
_rlnPipeLineProcessName #1
_rlnPipeLineProcessAlias #2
_rlnPipeLineProcessTypeLabel #3
_rlnPipeLineProcessStatusLabel #4
External/job002/       None relion.external    Running


# version 30001

data_pipeline_nodes

loop_
_rlnPipeLineNodeName #1
_rlnPipeLineNodeTypeLabel #2
Import/job001/particles.star ParticlesData.star.relion
"""
# RELION 5.0 (tag 5.0.1): version 50001 and a node type depth column.
PIPELINE_50 = PIPELINE_40.replace("# version 30001", "# version 50001").replace(
    "_rlnPipeLineNodeTypeLabel #2\nImport/job001/particles.star ParticlesData.star.relion",
    "_rlnPipeLineNodeTypeLabel #2\n_rlnPipeLineNodeTypeLabelDepth #3\n"
    "Import/job001/particles.star ParticleGroupMetadata.star.relion 1")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION project folder (cwd) with a tiny particle set and an empty job folder."""
    monkeypatch.chdir(tmp_path)
    parts = make_particle_set(Path("Extract/job003"), n_classes=3, n_per_class=4, box=16)
    job = Path("External/job012")
    job.mkdir(parents=True)
    return parts, job


@pytest.fixture
def logs(capsys):
    ej.configure_logging()
    yield capsys
    root = __import__("logging").getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cryo_drvae_relion", False):
            root.removeHandler(h)


def _argv(parts, job, *extra):
    return ["--o", f"{job}/", "--in_parts", str(parts.star), "--j", "1", *extra]


# ---- command line -------------------------------------------------------------------------

def test_parses_the_command_line_relion_313_builds(project, monkeypatch):
    parts, job = project
    argv = relion313_external_argv(
        "relion_cryo_drvae.py", f"{job}/", in_parts=str(parts.star),
        params=[("K", "4"), ("continue", ""), ("", "ignored"), ("iter", "3"), ("gpu", "0,1"),
                ("particle_diameter", "90"), ("balance", "0.3"), ("epochs_initial", "1")],
        nr_threads=3, other_args="--seed 7 --extra 1")
    # the bare flag, the dropped pair and the appended --pipeline_control are RELION's doing
    assert argv[argv.index("--continue") + 1] == "--iter"
    assert argv[-2:] == ["--pipeline_control", f"{job}/"]
    args, unknown = ej.build_parser().parse_known_args(argv)
    assert unknown == ["--extra", "1"]
    cfg = ej.config_from_args(args)
    assert cfg.cluster.n_classes == 4 and cfg.cluster.n_rounds == 3
    assert cfg.threads == 3 and cfg.seed == 7 and cfg.continue_run is True
    assert cfg.device == "cuda:0,1" and ej.gpu_count(cfg.device) == 2
    command = ej.torchrun_command(argv, 2)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-len(argv):] == argv
    assert cfg.data.particle_diameter == 90.0 and cfg.cluster.balance == 0.3
    assert cfg.train.epochs_initial == 1
    assert cfg.data.particles_star == str(parts.star)
    assert cfg.output_prefix == "External/job012/run_it003"


def test_relion_style_nr_classes_and_defaults(project):
    parts, job = project
    args, _ = ej.build_parser().parse_known_args(_argv(parts, job, "--nr_classes", "6"))
    cfg = ej.config_from_args(args)
    assert cfg.cluster.n_classes == 6 and cfg.continue_run is False and cfg.device == "cpu"
    assert cfg.output_prefix == f"External/job012/run_it{cfg.cluster.n_rounds:03d}"


def _cli_device(gpu_args: list[str], tmp_path, monkeypatch) -> str:
    """The device ``cryo-drvae classify`` builds from ``gpu_args`` (the run itself replaced)."""
    from click.testing import CliRunner
    from cryo_drvae import pipeline
    from cryo_drvae.cli import main
    seen = []
    monkeypatch.setattr(pipeline, "run", lambda cfg: seen.append(cfg) or FakeResult({}))
    out = tmp_path / f"cli{len(list(tmp_path.iterdir()))}"
    result = CliRunner().invoke(main, ["classify", "--i", "p.star", "--o", str(out / "run"), *gpu_args])
    assert result.exit_code == 0, result.output
    return seen[0].device


@pytest.mark.parametrize("gpu_args, device", [([], "cpu"), (["--gpu", "0"], "cuda:0"), (["--gpu", "1,0"], "cuda:1,0"),
                                              (["--gpu", "0:1"], "cuda:0,1"), (["--gpu", ""], "cuda:0")])
def test_gpu_is_read_as_classify_reads_it(project, tmp_path, monkeypatch, gpu_args, device):
    """One parser: whether CUDA is there plays no part in reading --gpu (no silent CPU fallback)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parts, job = project
    args, _ = ej.build_parser().parse_known_args(_argv(parts, job, *gpu_args))
    assert ej.config_from_args(args).device == device == _cli_device(gpu_args, tmp_path, monkeypatch)
    args, _ = ej.build_parser().parse_known_args(_argv(parts, job, "--gpu"))     # a bare flag: GPU 0
    assert ej.config_from_args(args).device == "cuda:0"
    with pytest.raises(ej.ConfigError, match="device numbers"):
        ej.config_from_args(ej.build_parser().parse_known_args(_argv(parts, job, "--gpu", "a"))[0])


def test_gpu_without_cuda_fails_the_job_as_it_fails_classify(project, logs, monkeypatch):
    torch = pytest.importorskip("torch")
    from click.testing import CliRunner
    from cryo_drvae.cli import main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--gpu", "0"))            # the real pipeline
    err = logs.readouterr().err
    assert rc == ej.RC_FAILURE and (job / ej.EXIT_FAILURE).exists() and not (job / ej.EXIT_SUCCESS).exists()
    assert "CUDA is not available" in err and "Traceback" not in err
    cli = CliRunner().invoke(main, ["classify", "--i", str(parts.star), "--o", "Class2D/run", "--K", "3",
                                    "--gpu", "0"])
    assert cli.exit_code == 1 and "CUDA is not available" in cli.output


def test_a_gpu_id_beyond_the_visible_ones_is_a_config_error(monkeypatch):
    torch = pytest.importorskip("torch")
    from cryo_drvae.runtime import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ej.ConfigError, match="device 3 requested but only 2"):
        resolve_device("cuda:0,3")


@pytest.mark.parametrize("text,version", [(PIPELINE_31, 3), (PIPELINE_40, 4), (PIPELINE_50, 5), ("data_\n", None)])
def test_detects_relion_version_from_pipeline_star(text, version, tmp_path):
    assert ej.detect_relion_version_from_text(text) == version
    (tmp_path / "job_pipeline.star").write_text(text)
    assert ej.detect_relion_version(tmp_path, project_dir=tmp_path / "none") == version


# ---- success ------------------------------------------------------------------------------

@pytest.mark.parametrize("pipeline_text,labels", [
    (PIPELINE_31, ("ParticleGroupMetadata.star.relion.class2d", "OptimiserData.star.relion.class2d")),
    (PIPELINE_40, ("ParticlesData.star.relion.class2d", "ProcessData.star.relion.optimiser.class2d")),
    (PIPELINE_50, ("ParticleGroupMetadata.star.relion.class2d", "OptimiserData.star.relion.class2d")),
])
def test_success_writes_outputs_then_nodes_then_success_marker(project, logs, monkeypatch, pipeline_text, labels):
    parts, job = project
    (job / "job_pipeline.star").write_text(pipeline_text)
    (job / ej.EXIT_FAILURE).touch()                          # stale marker of an earlier run
    prefix = f"{job}/run_it002"
    seen_at_success = {}
    real_touch = ej.touch

    def spy_touch(job_dir, name):
        seen_at_success[name] = sorted(os.listdir(job_dir))
        real_touch(job_dir, name)
    monkeypatch.setattr(ej, "touch", spy_touch)

    rc = ej.run_job(_argv(parts, job, "--K", "3", "--iter", "2"), pipeline_run=FakePipeline())
    assert rc == 0, logs.readouterr().err
    assert list(seen_at_success) == [ej.EXIT_SUCCESS]
    before = seen_at_success[ej.EXIT_SUCCESS]
    for name in ("RELION_OUTPUT_NODES.star", "run_it002_data.star", "run_it002_model.star",
                 "run_it002_optimiser.star", "run_it002_class_averages.star", "run_it002_class_averages.mrcs"):
        assert name in before, f"{name} must exist before {ej.EXIT_SUCCESS}"
    assert not (job / ej.EXIT_FAILURE).exists() and not (job / ej.EXIT_ABORTED).exists()

    nodes = starfile.read(job / ej.OUTPUT_NODES)
    assert list(nodes.columns) == ["rlnPipeLineNodeName", "rlnPipeLineNodeType", "rlnPipeLineNodeTypeLabel"]
    table = {row.rlnPipeLineNodeName: (row.rlnPipeLineNodeType, row.rlnPipeLineNodeTypeLabel)
             for row in nodes.itertuples()}
    assert table[f"{prefix}_data.star"] == (3, labels[0])
    assert table[f"{prefix}_optimiser.star"] == (9, labels[1])
    assert table[f"{prefix}_model.star"][0] == 8
    assert table[f"{prefix}_class_averages.star"][0] == 5

    opt = starfile.read(f"{prefix}_optimiser.star")
    assert opt["rlnModelStarFile"] == f"{prefix}_model.star"
    assert opt["rlnExperimentalDataStarFile"] == f"{prefix}_data.star"
    assert opt["rlnOutputRootName"] == f"{job}/run"
    assert opt["rlnParticleDiameter"] == pytest.approx(DIAMETER_FRACTION * 16 * 3.0)   # what the run used
    refs = starfile.read(f"{prefix}_class_averages.star")
    assert list(refs["rlnReferenceImage"]) == [f"{k:06d}@{prefix}_class_averages.mrcs" for k in (1, 2, 3)]


def test_current_iteration_is_the_rounds_actually_run(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--iter", "5"), pipeline_run=FakePipeline(rounds_run=2))
    assert rc == 0, logs.readouterr().err
    opt = starfile.read(job / "run_it005_optimiser.star")
    assert opt["rlnCurrentIteration"] == 2 and opt["rlnNumberOfIterations"] == 5


@pytest.mark.slow
def test_current_iteration_is_what_the_real_run_reports(project, logs):
    """The real pipeline, converged before --iter: rlnCurrentIteration is its RunResult.n_rounds."""
    from cryo_drvae import pipeline
    from cryo_drvae.simulate import SimulationConfig, simulate_dataset
    _, job = project
    sim = simulate_dataset(SimulationConfig(n_classes=2, n_particles=40, snr=0.5, box_size=32, pixel_size=5.0,
                                            seed=5), "Extract/job004", project_dir=".")
    results = []

    def real_run(cfg, should_abort):
        results.append(pipeline.run(cfg, should_abort))
        return results[-1]

    argv = ["--o", f"{job}/", "--in_parts", str(sim.star_path), "--j", "1", "--K", "2", "--iter", "6",
            "--psi_step", "30", "--tolerance", "0.5"]
    rc = ej.run_job(argv, pipeline_run=real_run)
    assert rc == 0, logs.readouterr().err
    opt = starfile.read(job / "run_it006_optimiser.star")
    assert 1 <= results[0].n_rounds < 6, results[0].result.history        # converged before --iter
    assert opt["rlnCurrentIteration"] == results[0].n_rounds and opt["rlnNumberOfIterations"] == 6


def test_relion_class2d_flags_follow_the_shared_policy(project, logs):
    """RELION names with a meaning here are used; the other relion_refine flags are warned about."""
    parts, job = project
    pipeline = FakePipeline()
    rc = ej.run_job(_argv(parts, job, "--nr_classes", "3", "--ctf", "--tau2_fudge", "2", "--offset_range", "4",
                          "--angpix", "2.5", "--dont_check_norm", "--tolerance", "0.05", "--pool", "30",
                          "--zero_mask", "--random_seed", "9"), pipeline_run=pipeline)
    assert rc == 0
    cfg = pipeline.calls[0]
    assert cfg.cluster.n_classes == 3 and cfg.cluster.max_shift_px == 4.0 and cfg.data.pixel_size == 2.5
    assert cfg.cluster.tolerance == 0.05 and cfg.seed == 9
    err = logs.readouterr().err
    warned = [line for line in err.splitlines() if "no equivalent" in line]
    assert len(warned) == 1
    for flag in ("--ctf", "--tau2_fudge 2", "--pool 30", "--zero_mask"):
        assert flag in warned[0]
    assert "dont_check_norm" not in err and "does not know" not in err


def test_unknown_arguments_warn_but_do_not_fail(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--in_mics", "x.star", "--highres", "8"),
                    pipeline_run=FakePipeline())
    assert rc == 0 and (job / ej.EXIT_SUCCESS).exists()
    assert "--in_mics x.star --highres 8" in logs.readouterr().err


# ---- failure ------------------------------------------------------------------------------

@pytest.mark.slow
def test_missing_input_star_fails_with_one_line_naming_the_file(project):
    parts, job = project
    (job / ej.EXIT_SUCCESS).touch()                          # stale
    proc = subprocess.run(
        [sys.executable, "-m", "relion_wrapper", "--o", f"{job}/", "--in_parts", "Select/job011/gone.star",
         "--j", "1", "--pipeline_control", f"{job}/"],
        capture_output=True, text=True, env=run_env(), timeout=60)
    assert proc.returncode == 1
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1, proc.stderr
    assert "Select/job011/gone.star" in err_lines[0] and "Traceback" not in proc.stderr
    assert sorted(os.listdir(job)) == [ej.EXIT_FAILURE]


def test_bad_parameter_value_fails_cleanly(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "--iter", "2"), pipeline_run=FakePipeline())
    assert rc == 1 and (job / ej.EXIT_FAILURE).exists()
    assert "--K needs a value" in logs.readouterr().err


def test_pipeline_error_gives_failure_marker_and_no_outputs(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3"), pipeline_run=FakePipeline(raises=ej.InputFileError("x.mrcs: truncated")))
    err = logs.readouterr().err
    assert rc == 1 and (job / ej.EXIT_FAILURE).exists() and not (job / ej.EXIT_SUCCESS).exists()
    assert err.strip() == "ERROR: x.mrcs: truncated"
    assert not list(job.glob("run_it*")) and not (job / ej.OUTPUT_NODES).exists()


def test_unexpected_error_keeps_its_traceback(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job), pipeline_run=FakePipeline(raises=RuntimeError("boom")))
    err = logs.readouterr().err
    assert rc == 1 and (job / ej.EXIT_FAILURE).exists()
    assert "Traceback" in err and "RuntimeError: boom" in err


# ---- abort --------------------------------------------------------------------------------

def _abort_after(job: Path, seconds: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), (job / ej.ABORT_NOW).touch()))
    t.start()
    return t


@pytest.mark.parametrize("write_data_first", [False, True])
def test_abort_file_stops_the_run_and_leaves_no_outputs(project, logs, write_data_first):
    parts, job = project
    if write_data_first:                 # abort noticed only after the data STAR was written
        fake = FakePipeline(steps=0, write_data_first=True)
        run, t = (lambda cfg, should_abort: fake(cfg, should_abort=lambda: True)), None
    else:
        run, t = FakePipeline(steps=200, delay=0.01), _abort_after(job, 0.3)
    start = time.time()
    rc = ej.run_job(_argv(parts, job, "--K", "3"), pipeline_run=run)
    if t:
        t.join()
    assert rc == 2 and time.time() - start < 1.9
    assert (job / ej.EXIT_ABORTED).exists()
    assert not (job / ej.EXIT_SUCCESS).exists() and not (job / ej.EXIT_FAILURE).exists()
    assert not list(job.glob("run_it*")) and not (job / ej.OUTPUT_NODES).exists()


# ---- --auto_select ----------------------------------------------------------------------------

class ScoredPipeline(FakePipeline):
    """The stand-in pipeline, with given rlnClassScore values in its model STAR."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def __call__(self, cfg, should_abort=lambda: False):
        result = super().__call__(cfg, should_abort)
        blocks = starfile.read(result.paths["model_star"], always_dict=True)
        blocks["model_classes"]["rlnClassScore"] = self.scores
        starfile.write(blocks, result.paths["model_star"], overwrite=True)
        return result


@pytest.mark.parametrize("pipeline_text,label", [(PIPELINE_31, "ParticleGroupMetadata.star.relion"),
                                                 (PIPELINE_40, "ParticlesData.star.relion")])
def test_auto_select_writes_the_selected_particles_and_declares_them(project, logs, pipeline_text, label):
    parts, job = project
    (job / "job_pipeline.star").write_text(pipeline_text)
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--iter", "2", "--auto_select", "--min_score", "0.5"),
                    pipeline_run=ScoredPipeline([0.9, 0.2, 0.95]))
    assert rc == 0, logs.readouterr().err
    data = starfile.read(job / "run_it002_data.star", always_dict=True)
    kept = starfile.read(job / "particles.star", always_dict=True)
    expected = data["particles"][data["particles"]["rlnClassNumber"].isin([1, 3])].reset_index(drop=True)
    assert list(kept["particles"]["rlnImageName"]) == list(expected["rlnImageName"])
    # every column kept, plus the figure of merit that select measured (the stand-in wrote none)
    assert list(kept["particles"].columns) == list(data["particles"].columns) + ["rlnParticleFigureOfMerit"]
    nodes = starfile.read(job / ej.OUTPUT_NODES)
    table = {row.rlnPipeLineNodeName: (row.rlnPipeLineNodeType, row.rlnPipeLineNodeTypeLabel)
             for row in nodes.itertuples()}
    assert table[f"{job}/particles.star"] == (3, label)
    assert table[f"{job}/class_averages.star"][0] == 5
    assert (job / "rank_model.star").exists() and (job / "rank_classes.png").exists()


class FittedPipeline(ScoredPipeline):
    """The scored stand-in, with a figure of merit per particle in its data STAR (row i: i / n)."""

    def __call__(self, cfg, should_abort=lambda: False):
        result = super().__call__(cfg, should_abort)
        blocks = starfile.read(result.paths["data_star"], always_dict=True)
        n = len(blocks["particles"])
        blocks["particles"]["rlnParticleFigureOfMerit"] = np.arange(n) / n
        starfile.write(blocks, result.paths["data_star"], overwrite=True)
        return result


def test_auto_select_drops_particles_below_min_fom(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--iter", "2", "--auto_select", "--min_score", "0.5",
                          "--min_fom", "0.3"), pipeline_run=FittedPipeline([0.9, 0.2, 0.95]))
    assert rc == 0, logs.readouterr().err
    data = starfile.read(job / "run_it002_data.star", always_dict=True)["particles"]
    kept = starfile.read(job / "particles.star", always_dict=True)["particles"]
    wanted = data["rlnClassNumber"].isin([1, 3]) & (data["rlnParticleFigureOfMerit"] >= 0.3)
    assert 0 < wanted.sum() < data["rlnClassNumber"].isin([1, 3]).sum()
    assert list(kept["rlnImageName"]) == list(data.loc[wanted, "rlnImageName"])


def test_without_auto_select_there_is_no_selection(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--min_score", "0.5"), pipeline_run=ScoredPipeline([0.9, 0.2, 0.95]))
    assert rc == 0
    assert not (job / "particles.star").exists()
    assert "--min_score 0.5 is ignored without --auto_select" in logs.readouterr().err


def test_min_fom_without_auto_select_is_ignored_with_a_warning(project, logs):
    parts, job = project
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--min_fom", "0.2"), pipeline_run=ScoredPipeline([0.9, 0.2, 0.95]))
    assert rc == 0 and not (job / "particles.star").exists()
    assert "--min_fom 0.2 is ignored without --auto_select" in logs.readouterr().err


def test_bad_min_score_fails_before_the_run(project, logs):
    parts, job = project
    pipeline = ScoredPipeline([0.9, 0.2, 0.95])
    rc = ej.run_job(_argv(parts, job, "--K", "3", "--auto_select", "yes", "--min_score", "7"), pipeline_run=pipeline)
    assert rc == 1 and (job / ej.EXIT_FAILURE).exists() and not pipeline.calls
    assert "--min_score must be in [0, 1], got 7.0" in logs.readouterr().err
