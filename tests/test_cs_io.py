"""cryoSPARC in and out: a .cs of the same particles as a STAR gives the same CTF, images and classes,
and the _particles.cs / _templates.cs written say what _data.star / _model.star say."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from click.testing import CliRunner
from cryosparc.dataset import Dataset

from cryo_drvae import cs_io, star_io
from cryo_drvae.cli import main
from cryo_drvae.ctf import ctf_images, params_from_particles
from cryo_drvae.errors import InputFileError
from cryo_drvae.outputs import ClassificationResult
from cryo_drvae.simulate import SimulationConfig, simulate_dataset
from cryo_drvae.stack import ParticleStack

F4_COLUMNS = [star_io.DEFOCUS_U, star_io.DEFOCUS_V]
F4_OPTICS = [star_io.VOLTAGE, star_io.SPHERICAL_ABERRATION, star_io.AMPLITUDE_CONTRAST,
             star_io.IMAGE_PIXEL_SIZE]


def f4(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)


def as_cs_can_hold(table: star_io.ParticleTable, path: Path) -> Path:
    """The same particles with every CTF value one a float32 .cs holds exactly (angles stored in
    radians), written as a STAR beside the original, so both files describe identical particles."""
    optics = table.optics.copy()
    for col in F4_OPTICS:
        optics[col] = f4(optics[col])
    angle = f4(np.deg2rad(table.particles[star_io.DEFOCUS_ANGLE].to_numpy(np.float64))) * (180.0 / np.pi)
    columns = {col: f4(table.particles[col]) for col in F4_COLUMNS}
    columns[star_io.DEFOCUS_ANGLE] = angle
    star_io.write_particles(path, star_io.ParticleTable(table.path, table.particles.copy(), optics), columns)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A RELION-style set (sim/particles.star + sim/Particles/*.mrcs) and the same particles as
    a cryoSPARC project would hold them: sim/J12/J12_particles.cs with blob/path relative to sim/."""
    root = tmp_path_factory.mktemp("cs_project")
    sim = simulate_dataset(SimulationConfig(n_classes=4, n_particles=200, snr=0.1, box_size=48,
                                            pixel_size=4.0, particles_per_stack=80, seed=3), root / "sim")
    exact_star = as_cs_can_hold(star_io.read_particles(sim.star_path), root / "sim" / "particles_f4.star")
    dataset = cs_io.star_to_dataset(star_io.read_particles(exact_star), seed=1)
    dataset["blob/path"] = np.array([">" + p for p in dataset["blob/path"]], dtype=object)  # as imports are
    (root / "sim" / "J12").mkdir()
    cs_path = root / "sim" / "J12" / "J12_particles.cs"
    cs_io.save_dataset(cs_path, dataset)
    return {"root": root, "sim": sim, "star": sim.star_path, "exact_star": exact_star, "cs": cs_path}


def test_cs_fields_follow_cryosparc_conventions(project):
    """Units and indices against the simulated STAR: radians, 0-based slices, float32 as cryoSPARC."""
    star = star_io.read_particles(project["star"]).per_particle()
    ds = cs_io.star_to_dataset(star_io.read_particles(project["star"]))
    assert np.allclose(ds["ctf/df_angle_rad"], np.deg2rad(star[star_io.DEFOCUS_ANGLE]), atol=1e-6)
    assert np.allclose(ds["ctf/df1_A"], star[star_io.DEFOCUS_U], rtol=1e-7)
    assert np.allclose(ds["ctf/df2_A"], star[star_io.DEFOCUS_V], rtol=1e-7)
    slices = star[star_io.IMAGE_NAME].str.partition("@")[0].astype(int).to_numpy()
    assert np.array_equal(ds["blob/idx"], slices - 1)
    assert ds["ctf/df1_A"].dtype == np.float32 and ds["blob/idx"].dtype == np.uint32
    assert np.all(ds["blob/shape"] == 48) and np.all(ds["blob/sign"] == 1)


def test_same_particles_same_ctf(project):
    """CTF of the .cs equals the CTF of the STAR: exactly for the float32-exact STAR, and to float32
    precision for the original (double precision) STAR."""
    cs_table = cs_io.read_cs_particles(project["cs"], data_dir=project["sim"].star_path.parent)
    from_cs = params_from_particles(cs_table.per_particle())
    exact = params_from_particles(star_io.read_particles(project["exact_star"]).per_particle())
    original = params_from_particles(star_io.read_particles(project["star"]).per_particle())
    for name in from_cs.__dataclass_fields__:
        assert np.array_equal(getattr(from_cs, name), getattr(exact, name)), name
        assert np.allclose(getattr(from_cs, name), getattr(original, name), rtol=1e-6, atol=1e-4), name
    assert np.array_equal(ctf_images(from_cs, 48, 4.0), ctf_images(exact, 48, 4.0))
    assert np.abs(ctf_images(from_cs, 48, 4.0) - ctf_images(original, 48, 4.0)).max() < 1e-3


def test_images_and_sign(project, tmp_path):
    """blob/path ('>' dropped) + blob/idx reach the same pixels; blob/sign -1 negates them."""
    star_stack = ParticleStack.from_table(star_io.read_particles(project["star"]),
                                          data_dir=project["star"].parent)
    cs_table = cs_io.read_cs_particles(project["cs"])      # no data_dir: found above the .cs folder
    rows = np.array([0, 79, 80, 199])
    with ParticleStack.from_table(cs_table) as cs_stack:
        assert np.array_equal(cs_stack.read(rows), star_stack.read(rows))
    flipped = Dataset.load(project["cs"])
    flipped["blob/sign"] = -1.0
    cs_io.save_dataset(project["cs"].parent / "flipped.cs", flipped)
    table = cs_io.read_cs_particles(project["cs"].parent / "flipped.cs")
    with ParticleStack.from_table(table) as cs_stack:
        assert np.array_equal(cs_stack.read(rows), -star_stack.read(rows))
    star_stack.close()


def test_missing_blobs_one_error(project, tmp_path):
    ds = Dataset.load(project["cs"])
    ds["blob/path"] = np.array([p.replace("stack_002", "gone_2").replace("stack_003", "gone_3")
                                for p in ds["blob/path"]], dtype=object)
    bad = tmp_path / "bad.cs"
    cs_io.save_dataset(bad, ds)
    with pytest.raises(InputFileError, match=r"bad\.cs: 2 of 3 particle blobs not found .*gone_2.*gone_3"
                                             r".*--data_dir"):
        cs_io.read_cs_particles(bad, data_dir=project["sim"].star_path.parent)


def test_bad_cs_files(tmp_path):
    junk = tmp_path / "junk.cs"
    junk.write_text("not a dataset\n")
    with pytest.raises(InputFileError, match=r"junk\.cs: cannot be read as a cryoSPARC dataset"):
        cs_io.read_any(junk)
    with pytest.raises(InputFileError, match=r"nope\.cs: cryoSPARC particle file not found"):
        cs_io.read_any(tmp_path / "nope.cs")
    no_blob = Dataset.allocate(3, [("ctf/df1_A", "<f4")])
    cs_io.save_dataset(tmp_path / "ctf_only.cs", no_blob)
    with pytest.raises(InputFileError, match=r"ctf_only\.cs: no blob/path, blob/idx, blob/psize_A"):
        cs_io.read_any(tmp_path / "ctf_only.cs")


def test_alignments_slot_replaced_and_fields_kept():
    source = Dataset.allocate(4, [("blob/psize_A", "<f4"), ("location/center_x_frac", "<f4"),
                                  ("alignments2D/error", "<f4"), ("alignments2D/class", "<u4")])
    source["blob/psize_A"] = 2.5
    source["location/center_x_frac"] = [0.1, 0.2, 0.3, 0.4]
    result = ClassificationResult(labels=np.array([1, 0, 1, 1]), psi_deg=np.array([90.0, -45.0, 0.0, 180.0]),
                                  origin_px=np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0], [-3.0, 1.5]]),
                                  confidence=np.array([0.9, 0.5, 1.0, 0.25]), class_averages=np.zeros((2, 8, 8)),
                                  class_resolution=np.array([10.0, 12.0]), pixel_size=2.5)
    out = cs_io.particles_dataset(source, result, seed=4)
    assert "alignments2D/error" not in out.fields()
    assert np.array_equal(out["uid"], source["uid"])
    assert np.array_equal(out["location/center_x_frac"], source["location/center_x_frac"])
    assert np.array_equal(out["alignments2D/class"], [1, 0, 1, 1])
    assert np.allclose(out["alignments2D/pose"], [np.pi / 2, 7 * np.pi / 4, 0.0, np.pi])   # [0, 2 pi)
    assert np.allclose(out["alignments2D/shift"], result.origin_px)
    assert np.allclose(out["alignments2D/class_ess"], [1 / 0.9, 2.0, 1.0, 4.0])
    assert sorted(np.bincount(out["alignments2D/split"])) == [2, 2]
    assert np.all(out["alignments2D/psize_A"] == 2.5)


@pytest.fixture(scope="module")
def runs(project):
    """classify the .cs and the float32-exact STAR (with --cs_out) with one seed."""
    root = project["root"]
    common = ["--K", "4", "--j", "1", "--iter", "3", "--seed", "2"]
    cs_run = CliRunner().invoke(main, ["classify", "--i", str(project["cs"]), "--data_dir",
                                       str(project["sim"].star_path.parent), "--o", str(root / "cs" / "run"),
                                       *common])
    star_run = CliRunner().invoke(main, ["classify", "--i", str(project["exact_star"]), "--o",
                                         str(root / "star" / "run"), "--cs_out", *common])
    assert cs_run.exit_code == 0, cs_run.output
    assert star_run.exit_code == 0, star_run.output
    return {"cs": root / "cs" / "run", "star": root / "star" / "run"}


@pytest.mark.slow
def test_star_and_cs_give_identical_classes(runs):
    cs_data = starfile.read(f"{runs['cs']}_data.star")["particles"]
    star_data = starfile.read(f"{runs['star']}_data.star")["particles"]
    assert np.array_equal(cs_data["rlnClassNumber"], star_data["rlnClassNumber"])
    assert np.array_equal(cs_data["rlnAnglePsi"], star_data["rlnAnglePsi"])
    cs_classes = Dataset.load(f"{runs['cs']}_particles.cs")["alignments2D/class"]
    star_classes = Dataset.load(f"{runs['star']}_particles.cs")["alignments2D/class"]
    assert np.array_equal(cs_classes, star_classes)
    assert len(np.unique(cs_classes)) == 4


@pytest.mark.slow
def test_particles_cs_and_data_star_agree(project, runs):
    """Our _data.star and _particles.cs turned into each other's terms (pyem's csparc2star mapping)."""
    prefix = runs["cs"]
    data = starfile.read(f"{prefix}_data.star")
    particles, optics = data["particles"], data["optics"]
    out = Dataset.load(f"{prefix}_particles.cs")
    source = Dataset.load(project["cs"])
    assert len(out) == len(source) == len(particles)
    assert set(source.fields()) <= set(out.fields())
    for field in source.fields():
        assert np.array_equal(out[field], source[field]), field
    psize = optics[star_io.IMAGE_PIXEL_SIZE].to_numpy()[particles[star_io.OPTICS_GROUP].to_numpy() - 1]
    assert np.array_equal(out["alignments2D/class"], particles["rlnClassNumber"] - 1)
    turn = np.rad2deg(out["alignments2D/pose"]) - particles["rlnAnglePsi"]
    assert np.allclose((turn + 180) % 360 - 180, 0, atol=1e-4)
    assert np.all((out["alignments2D/pose"] >= 0) & (out["alignments2D/pose"] < 2 * np.pi))
    assert np.allclose(out["alignments2D/shift"][:, 0], particles["rlnOriginXAngst"] / psize, atol=1e-4)
    assert np.allclose(out["alignments2D/shift"][:, 1], particles["rlnOriginYAngst"] / psize, atol=1e-4)
    assert np.allclose(out["alignments2D/psize_A"], psize)
    assert np.allclose(out["alignments2D/class_posterior"], particles["rlnMaxValueProbDistribution"], atol=1e-6)
    assert np.allclose(out["ctf/df1_A"], particles["rlnDefocusU"])
    assert np.allclose(np.rad2deg(out["ctf/df_angle_rad"]), particles["rlnDefocusAngle"], atol=1e-4)
    names = particles["rlnImageName"].str.partition("@")
    assert np.array_equal(out["blob/idx"], names[0].astype(int) - 1)
    assert list(names[2]) == [p.lstrip(">") for p in out["blob/path"]]


@pytest.mark.slow
def test_templates_describe_the_class_averages(runs):
    prefix = runs["cs"]
    templates = Dataset.load(f"{prefix}_templates.cs")
    model = starfile.read(f"{prefix}_model.star")["model_classes"]
    with mrcfile.open(f"{prefix}_class_averages.mrc") as mrc:
        stack, voxel = mrc.data.copy(), float(mrc.voxel_size.x)
    with mrcfile.open(f"{prefix}_class_averages.mrcs") as mrc:
        relion = mrc.data.copy()
    assert len(templates) == stack.shape[0] == len(model) == 4
    assert set(templates["blob/path"]) == {f"{prefix}_class_averages.mrc"}
    assert np.array_equal(templates["blob/idx"], np.arange(4))
    assert np.all(templates["blob/shape"] == stack.shape[-1])
    assert np.allclose(templates["blob/psize_A"], voxel)
    assert np.array_equal(stack, relion)                 # same slices, same order, same axes
    assert np.allclose(templates["blob/res_A"], model["rlnEstimatedResolution"])
    counts = np.bincount(Dataset.load(f"{prefix}_particles.cs")["alignments2D/class"], minlength=4)
    assert np.array_equal(counts, model["rlnParticleNumber"])


@pytest.mark.slow
def test_star_input_without_cs_out_writes_no_cs(project, tmp_path):
    result = CliRunner().invoke(main, ["classify", "--i", str(project["star"]), "--o", str(tmp_path / "run"),
                                       "--K", "4", "--j", "1", "--iter", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run_data.star").exists()
    assert not list(tmp_path.glob("*.cs")) and not (tmp_path / "run_class_averages.mrc").exists()


#: Field layout of a particle .cs from cryoSPARC's Extract job (as in cryosparc-tools' T20S fixture).
EXTRACT_FIELDS = [("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
                  ("blob/sign", "<f4"), ("blob/import_sig", "<u8"), ("ctf/type", "O"), ("ctf/exp_group_id", "<u4"),
                  ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
                  ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
                  ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"), ("ctf/shift_A", "<f4", (2,)),
                  ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)), ("ctf/tetra_A", "<f4", (4,)),
                  ("ctf/anisomag", "<f4", (4,)), ("ctf/bfactor", "<f4"),
                  ("location/micrograph_path", "O"), ("location/center_x_frac", "<f4")]


@pytest.mark.slow
def test_cryosparc_extract_layout_classifies_like_the_star(project, runs, tmp_path, monkeypatch):
    """An Extract-job style project: *_particles.mrc stacks in micrograph contrast (blob/sign -1),
    the full blob/ctf/location field set, run from the project folder without --data_dir."""
    star = star_io.read_particles(project["exact_star"])
    stack = ParticleStack.from_table(star, data_dir=project["exact_star"].parent)
    exact = cs_io.star_to_dataset(star, seed=1)
    ds = Dataset.allocate(len(exact), EXTRACT_FIELDS)
    ds["uid"] = exact["uid"]
    extract = tmp_path / "P9" / "J30" / "extract"
    extract.mkdir(parents=True)
    for code, name in enumerate(sorted(set(exact["blob/path"]))):
        rows = np.flatnonzero(exact["blob/path"] == name)
        mrc_name = f"J30/extract/{code:021d}_mic{code}_patch_aligned_doseweighted_particles.mrc"
        with mrcfile.new(tmp_path / "P9" / mrc_name) as mrc:
            mrc.set_data(-stack.read(rows))                    # micrograph contrast: protein dark
        ds["blob/path"][rows] = mrc_name
        ds["location/micrograph_path"][rows] = f"J14/motioncorrected/mic{code}.mrc"
    stack.close()
    for field in ["blob/idx", "blob/shape", "blob/psize_A", "ctf/exp_group_id", *cs_io.CTF_FIELDS]:
        ds[field] = exact[field]
    ds["blob/sign"] = -1.0
    ds["ctf/type"] = "spline"
    ds["ctf/anisomag"] = [1.0, 0.0, 0.0, 1.0]
    cs_path = tmp_path / "P9" / "J30" / "J30_particles.cs"
    cs_io.save_dataset(cs_path, ds)
    assert Dataset.load(cs_path)["blob/path"][0].startswith("J30/extract/")

    monkeypatch.chdir(tmp_path / "P9")
    result = CliRunner().invoke(main, ["classify", "--i", "J30/J30_particles.cs", "--o", "Class2D/run",
                                       "--K", "4", "--j", "1", "--iter", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    data = starfile.read("Class2D/run_data.star")["particles"]
    reference = starfile.read(f"{runs['star']}_data.star")["particles"]
    assert np.array_equal(data["rlnClassNumber"], reference["rlnClassNumber"])
    assert data["rlnImageName"].iloc[0] == f"000001@{ds['blob/path'][0]}"
    assert data["rlnMicrographName"].iloc[0] == "J14/motioncorrected/mic0.mrc"
    out = Dataset.load("Class2D/run_particles.cs")
    assert np.array_equal(out["alignments2D/class"], data["rlnClassNumber"] - 1)
    assert np.array_equal(out["ctf/anisomag"], ds["ctf/anisomag"]) and np.all(out["blob/sign"] == -1)
    with mrcfile.open("Class2D/run_class_averages.mrc") as ours, \
            mrcfile.open(f"{runs['star']}_class_averages.mrcs") as relion:
        assert np.allclose(ours.data, relion.data, atol=1e-6)  # protein-positive, as the RELION run's


@pytest.mark.slow
def test_relion_wrapper_takes_a_cs(project, tmp_path):
    """The RELION External-job wrapper passes a .cs through; a missing blob fails cleanly, no outputs."""
    from relion_wrapper import external_job

    job = tmp_path / "External" / "job007"
    job.mkdir(parents=True)
    common = ["--o", f"{job}/", "--data_dir", str(project["sim"].star_path.parent), "--K", "4", "--j", "1",
              "--iter", "2"]
    assert external_job.run_job(["--in_parts", str(project["cs"]), *common]) == 0
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    labels = Dataset.load(job / "run_it002_particles.cs")["alignments2D/class"]
    data = starfile.read(job / "run_it002_data.star")["particles"]
    assert np.array_equal(labels, data["rlnClassNumber"] - 1)

    ds = Dataset.load(project["cs"])
    ds["blob/path"] = np.array([p.replace("stack_001", "lost") for p in ds["blob/path"]], dtype=object)
    cs_io.save_dataset(tmp_path / "lost.cs", ds)
    for name in job.iterdir():
        name.unlink()
    assert external_job.run_job(["--in_parts", str(tmp_path / "lost.cs"), *common]) == 1
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not list(job.glob("run_it002_*"))


def test_bad_pixel_size_and_missing_ctf(project, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("cryo_drvae"), "propagate", True)   # a CLI run may have cut it
    ds = Dataset.load(project["cs"])
    no_ctf = ds.drop_fields([f for f in ds.fields() if f.startswith("ctf/")])
    cs_io.save_dataset(tmp_path / "no_ctf.cs", no_ctf)
    with caplog.at_level("WARNING"):
        table = cs_io.read_cs_particles(tmp_path / "no_ctf.cs", data_dir=project["sim"].star_path.parent)
    assert "no ctf/accel_kv, ctf/cs_mm" in caplog.text and "--no_ctf" in caplog.text
    with pytest.raises(InputFileError, match=r"no_ctf\.cs: missing CTF column"):
        params_from_particles(table.per_particle(), str(table.path))
    ds["blob/sign"][5] = 0.0
    cs_io.save_dataset(tmp_path / "sign.cs", ds)
    with pytest.raises(InputFileError, match=r"sign\.cs: blob/sign must be \+1 or -1, found \[0\.0, 1\.0\]"):
        cs_io.read_cs_particles(tmp_path / "sign.cs", data_dir=project["sim"].star_path.parent)
    ds["blob/sign"][5] = 1.0
    ds["blob/psize_A"][3] = 0.0
    cs_io.save_dataset(tmp_path / "zero.cs", ds)
    with pytest.raises(InputFileError, match=r"zero\.cs: blob/psize_A is not a positive number for 1 of 200"):
        cs_io.read_cs_particles(tmp_path / "zero.cs", data_dir=project["sim"].star_path.parent)


REAL_CS = os.environ.get("CRYO_DRVAE_REAL_CS")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CS, reason="set CRYO_DRVAE_REAL_CS to a cryoSPARC particle .cs beside its stack")
def test_real_cryosparc_export(tmp_path):
    """A real export (e.g. cryoDRGN's tests/data/empiar_10076_7.cs + .mrc, 7 particles, blob/sign -1)."""
    source = Dataset.load(REAL_CS)
    result = CliRunner().invoke(main, ["classify", "--i", REAL_CS, "--o", str(tmp_path / "run"), "--K", "2",
                                       "--j", "1", "--iter", "2"])
    assert result.exit_code == 0, result.output
    out = Dataset.load(tmp_path / "run_particles.cs")
    assert np.array_equal(out["uid"], source["uid"]) and len(out["alignments2D/class"]) == len(source)
    with mrcfile.open(tmp_path / "run_class_averages.mrc") as mrc:
        average = mrc.data[np.bincount(out["alignments2D/class"]).argmax()]
    box = average.shape[-1]
    y, x = np.mgrid[:box, :box] - box / 2
    r = np.hypot(y, x)
    assert average[r < box / 6].mean() > average[(r > box * 0.35) & (r < box * 0.45)].mean()  # protein bright
