"""scripts/cryosparc_external.py without a cryoSPARC instance: the file work for real, the job API
through a stand-in whose every call is checked against cryosparc-tools' own method signatures."""

from __future__ import annotations

import importlib.util
import inspect
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import mrcfile
import numpy as np
import pytest
from cryosparc.controllers.job import ExternalJobController
from cryosparc.controllers.project import ProjectController
from cryosparc.dataset import Dataset

from cryo_drvae import cs_io, star_io
from cryo_drvae.errors import CryoDrvaeError
from cryo_drvae.simulate import SimulationConfig, simulate_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cryosparc_external.py"
#: The alignments2D fields a cryoSPARC 2D classification writes (more than we compute).
CRYOSPARC_ALIGNMENTS2D = [("alignments2D/split", "<u4"), ("alignments2D/shift", "<f4", (2,)),
                          ("alignments2D/pose", "<f4"), ("alignments2D/psize_A", "<f4"),
                          ("alignments2D/error", "<f4"), ("alignments2D/error_min", "<f4"),
                          ("alignments2D/resid_pow", "<f4"), ("alignments2D/slice_pow", "<f4"),
                          ("alignments2D/image_pow", "<f4"), ("alignments2D/cross_cor", "<f4"),
                          ("alignments2D/alpha", "<f4"), ("alignments2D/weight", "<f4"),
                          ("alignments2D/pose_ess", "<f4"), ("alignments2D/shift_ess", "<f4"),
                          ("alignments2D/class_posterior", "<f4"), ("alignments2D/class", "<u4"),
                          ("alignments2D/class_ess", "<f4")]
TEMPLATE_BLOB = [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                 ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("blob/res_A", "<f4")]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cryosparc_external", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Checks each call against the real cryosparc-tools method and records it."""

    def __init__(self, real_class):
        self.real_class, self.calls = real_class, []

    def check(self, name, *args, **kwargs):
        inspect.signature(getattr(self.real_class, name)).bind(None, *args, **kwargs)   # TypeError if wrong
        self.calls.append(name)


class FakeJob:
    uid = "J20"

    def __init__(self, project_dir: Path, inputs: dict, recorder: Recorder):
        self.project_dir, self.inputs, self.rec = project_dir, inputs, recorder
        self.outputs, self.saved, self.status = {}, {}, None

    @property
    def dir(self):
        return PurePosixPath(self.project_dir / self.uid)

    def add_input(self, *args, **kwargs):
        self.rec.check("add_input", *args, **kwargs)
        return args[1]

    def connect(self, *args, **kwargs):
        self.rec.check("connect", *args, **kwargs)
        self.connected = args[1:]
        return True

    def add_output(self, type, name, *args, **kwargs):
        self.rec.check("add_output", type, name, *args, **kwargs)
        self.outputs[name] = type
        return name

    def load_input(self, *args, **kwargs):
        self.rec.check("load_input", *args, **kwargs)
        return self.inputs[args[0]]

    def alloc_output(self, name, alloc=0, **kwargs):
        self.rec.check("alloc_output", name, alloc, **kwargs)
        if self.outputs[name] == "particle":
            return Dataset({"uid": alloc["uid"]}).add_fields(CRYOSPARC_ALIGNMENTS2D)
        return Dataset.allocate(alloc, TEMPLATE_BLOB)

    def save_output(self, name, dataset, **kwargs):
        self.rec.check("save_output", name, dataset, **kwargs)
        self.saved[name] = (dataset, kwargs)

    def log(self, text, **kwargs):
        self.rec.check("log", text, **kwargs)

    @contextmanager
    def run(self):
        self.rec.check("run")
        self.status = "running"
        yield self
        self.status = "completed"


class FakeProject:
    def __init__(self, job: FakeJob, recorder: Recorder):
        self.job, self.rec = job, recorder

    @property
    def dir(self):
        return PurePosixPath(self.job.project_dir)

    def create_external_job(self, *args, **kwargs):
        self.rec.check("create_external_job", *args, **kwargs)
        return self.job


class FakeCryoSPARC:
    def __init__(self, project: FakeProject):
        self.project = project

    def find_project(self, uid):
        assert uid == "P3"
        return self.project


@pytest.fixture
def instance(tmp_path):
    """A project folder P3 with simulated particles as J12's output (blob/path relative to P3)."""
    project_dir = tmp_path / "P3"
    sim = simulate_dataset(SimulationConfig(n_classes=3, n_particles=90, snr=0.2, box_size=32, pixel_size=5.0,
                                            particles_per_stack=50, seed=8), project_dir / "J12")
    particles = cs_io.star_to_dataset(star_io.read_particles(sim.star_path), seed=5)
    particles["blob/path"] = np.array(["J12/" + p for p in particles["blob/path"]], dtype=object)
    job_rec, project_rec = Recorder(ExternalJobController), Recorder(ProjectController)
    job = FakeJob(project_dir, {"particles": particles}, job_rec)
    (project_dir / job.uid).mkdir()
    return {"cs": FakeCryoSPARC(FakeProject(job, project_rec)), "job": job, "particles": particles,
            "project_dir": project_dir, "job_calls": job_rec.calls, "project_calls": project_rec.calls}


def test_external_job_end_to_end_on_files(script, instance):
    args = script.parse_args(["--project", "P3", "--workspace", "W1", "--particles", "J12.particles",
                              "--K", "3", "--j", "1", "--iter", "2"])
    uid = script.run_external_job(instance["cs"], args)
    job, source = instance["job"], instance["particles"]
    assert uid == "J20" and job.status == "completed" and job.connected == ("J12", "particles")
    assert instance["project_calls"] == ["create_external_job"]
    calls = instance["job_calls"]
    assert calls[:5] == ["add_input", "connect", "add_output", "add_output", "run"]
    assert calls.index("load_input") < calls.index("save_output")
    assert calls.count("save_output") == 2

    particles, _ = job.saved["particles"]
    assert np.array_equal(particles["uid"], source["uid"])
    classes = particles["alignments2D/class"]
    assert classes.shape == (90,) and set(classes) == {0, 1, 2}
    assert np.all(particles["alignments2D/error"] == 0)          # computed by cryoSPARC only: default
    assert np.all((particles["alignments2D/class_posterior"] > 0) & (particles["alignments2D/class_posterior"] <= 1))

    templates, kwargs = job.saved["class_averages"]
    assert list(templates["blob/idx"]) == [0, 1, 2]
    assert set(templates["blob/path"]) == {"J20/cryo_drvae/run_class_averages.mrc"}
    assert Path(kwargs["image"]).is_file()
    with mrcfile.open(instance["project_dir"] / "J20" / "cryo_drvae" / "run_class_averages.mrc") as mrc:
        assert mrc.data.shape == (3, 32, 32)
    assert np.array_equal(np.bincount(classes, minlength=3) > 0, templates["blob/res_A"] < 999)


def test_fill_output_reorders_by_uid_and_refuses_strangers(script):
    ours = Dataset.allocate(3, [("alignments2D/class", "<u4"), ("alignments2D/extra", "<f4")])
    ours["alignments2D/class"] = [7, 8, 9]
    allocated = Dataset({"uid": ours["uid"][[2, 0, 1]]}).add_fields([("alignments2D/class", "<u4")])
    filled = script.fill_output(allocated, ours, match_uid=True)
    assert list(filled["alignments2D/class"]) == [9, 7, 8]
    assert "alignments2D/extra" not in filled.fields()
    strangers = Dataset.allocate(3, [("alignments2D/class", "<u4")])
    with pytest.raises(CryoDrvaeError, match="3 particles of the cryoSPARC output"):
        script.fill_output(strangers, ours, match_uid=True)


def test_arguments_are_checked(script, tmp_path):
    with pytest.raises(SystemExit):
        script.parse_args(["--project", "P3", "--workspace", "W1", "--particles", "J12"])
    args = script.parse_args(["--project", "P3", "--workspace", "W1", "--particles", "J12.particles",
                              "--K", "7", "--iter", "3", "--psi_step", "6", "--no_ctf"])
    cfg = script.classify_config(tmp_path / "in.cs", tmp_path, tmp_path / "J20", args)
    assert (cfg.cluster.n_classes, cfg.cluster.n_rounds, cfg.cluster.psi_step) == (7, 3, 6.0)
    assert not cfg.data.use_ctf and cfg.data.data_dir == str(tmp_path)
    assert cfg.output_prefix == str(tmp_path / "J20" / "cryo_drvae" / "run")
    bad = script.parse_args(["--project", "P3", "--workspace", "W1", "--particles", "J12.particles",
                             "--iter", "many"])
    with pytest.raises(CryoDrvaeError, match="--iter many"):
        script.classify_config(tmp_path / "in.cs", tmp_path, tmp_path / "J20", bad)
