#!/usr/bin/env python
"""Run cryo-drvae 2D classification as a cryoSPARC External job (cryosparc-tools job API).

    export CRYOSPARC_BASE_URL=http://cryosparc-master:39000
    export CRYOSPARC_EMAIL=me@lab.org CRYOSPARC_PASSWORD=...
    python scripts/cryosparc_external.py --project P3 --workspace W1 --particles J12.particles \\
        --K 50 --j 8 [--gpu 0] [--iter 6 ... any other `cryo-drvae classify` flag]

It creates an External job in the workspace, connects the particles output of J12, loads them,
classifies them with cryo-drvae inside the new job's folder and saves two outputs: ``particles``
(the input passed through, plus an ``alignments2D`` slot) and ``class_averages`` (``template``
type, one class average per row), ready for Select 2D Classes. Run it on a machine that sees the
cryoSPARC project folder (blob paths are relative to it; the outputs are written into the job
folder). Only ``run_external_job`` talks to cryoSPARC; the file work around it is in plain
functions that tests/test_cryosparc_external.py runs without a cryoSPARC instance.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
from cryosparc.dataset import Dataset

from cryo_drvae import cs_io, pipeline
from cryo_drvae.cli import classify, setup_logging
from cryo_drvae.config import parse_gpu
from cryo_drvae.config import RunConfig
from cryo_drvae.errors import CryoDrvaeError

logger = logging.getLogger("cryo_drvae.cryosparc_external")

INPUT_NAME = "particles"
INPUT_SLOTS = ["blob", "ctf"]
PARTICLES_OUTPUT = "particles"
TEMPLATES_OUTPUT = "class_averages"
WORK_FOLDER = "cryo_drvae"          # inside the External job's folder
JOB_TITLE = "cryo-drvae 2D classification"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True, help="project UID, e.g. P3")
    parser.add_argument("--workspace", required=True, help="workspace UID for the new job, e.g. W1")
    parser.add_argument("--particles", required=True, help="source job and output, e.g. J12.particles")
    parser.add_argument("--K", type=int, default=50, help="number of classes")
    parser.add_argument("--j", type=int, default=1, help="CPU threads")
    parser.add_argument("--gpu", default=None, help='GPU ids, e.g. "0" (default: CPU)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base_url", default=None, help="default: $CRYOSPARC_BASE_URL")
    args, classify_flags = parser.parse_known_args(argv)
    args.extra = classify_flags                        # passed on to `cryo-drvae classify`
    source_job, _, source_output = args.particles.partition(".")
    if not source_job or not source_output:
        parser.error(f"--particles {args.particles!r}: expected <job>.<output>, e.g. J12.particles")
    args.source_job, args.source_output = source_job, source_output
    return args


# --- file work (no cryoSPARC needed) -----------------------------------------------------

def write_input(particles: Dataset, job_dir: Path) -> Path:
    """Save the loaded input particles as ``<job_dir>/cryo_drvae/input_particles.cs``."""
    path = Path(job_dir) / WORK_FOLDER / "input_particles.cs"
    path.parent.mkdir(parents=True, exist_ok=True)
    cs_io.save_dataset(path, particles)
    return path


def classify_config(input_cs: Path, project_dir: Path, job_dir: Path, args: argparse.Namespace) -> RunConfig:
    """The cryo-drvae run: the input .cs, blobs relative to the project folder, outputs in the job
    folder; other ``cryo-drvae classify`` flags in ``args.extra`` are parsed by the CLI itself."""
    flags = ["--i", str(input_cs), "--data_dir", str(project_dir),
             "--o", str(Path(job_dir) / WORK_FOLDER / "run"), "--K", str(args.K), "--j", str(args.j),
             "--seed", str(args.seed), *(["--gpu", args.gpu] if args.gpu is not None else []), *args.extra]
    try:
        params = dict(classify.make_context("classify", flags).params)
    except click.ClickException as exc:
        raise CryoDrvaeError(f"classify options {' '.join(args.extra)!r}: {exc.format_message()}") from None
    for name in ("verbose", "dont_check_norm"):   # CLI-only flags, no config field
        params.pop(name, None)
    gpu, no_ctf = params.pop("gpu"), params.pop("no_ctf")
    return RunConfig.from_options(device=parse_gpu(gpu), use_ctf=not no_ctf, **params)


def job_outputs(prefix: str | Path, project_dir: Path) -> tuple[Dataset, Dataset]:
    """(particles, templates) to save: uid + alignments2D of ``<prefix>_particles.cs``, and
    ``<prefix>_templates.cs`` with ``blob/path`` relative to the project folder (cryoSPARC's
    convention for blob paths)."""
    particles = Dataset.load(f"{prefix}_particles.cs")
    particles = particles.filter_fields([f for f in particles.fields()
                                         if f == "uid" or f.startswith("alignments2D/")])
    templates = Dataset.load(f"{prefix}_templates.cs")
    relative = [_project_relative(Path(p), Path(project_dir)) for p in templates["blob/path"]]
    templates["blob/path"] = np.array(relative, dtype=object)
    return particles, templates


def fill_output(allocated: Dataset, ours: Dataset, match_uid: bool = False) -> Dataset:
    """Copy our values into a dataset cryoSPARC allocated for an output (its fields, its uids).

    With ``match_uid`` (particles: the allocation inherits the input's uids) our rows are put in
    the allocation's uid order first; otherwise rows correspond by position (templates). Fields
    cryoSPARC expects but we do not compute keep its defaults; ours that it does not expect are
    left out and logged.
    """
    if len(allocated) != len(ours):
        raise CryoDrvaeError(f"output has {len(ours)} rows but cryoSPARC allocated {len(allocated)}")
    if match_uid:
        position = {int(uid): row for row, uid in enumerate(ours["uid"])}
        missing = [int(uid) for uid in allocated["uid"] if int(uid) not in position]
        if missing:
            raise CryoDrvaeError(f"{len(missing)} particles of the cryoSPARC output (e.g. uid {missing[0]}) "
                                 f"are not in the classification; rerun the job")
        ours = ours.take(np.array([position[int(uid)] for uid in allocated["uid"]], dtype=np.int64))
    expected = set(allocated.fields())
    for field in ours.fields():
        if field != "uid" and field in expected:
            allocated[field] = ours[field]
    unused = [f for f in ours.fields() if f not in expected]
    if unused:
        logger.info("not part of the cryoSPARC output slot, left out: %s", ", ".join(unused))
    return allocated


# --- cryoSPARC (live) --------------------------------------------------------------------

def run_external_job(cs: Any, args: argparse.Namespace) -> str:
    """Create, run and complete the External job on the instance ``cs``; return its UID."""
    project = cs.find_project(args.project)
    job = project.create_external_job(args.workspace, title=JOB_TITLE)
    job.add_input("particle", INPUT_NAME, min=1, max=1, slots=INPUT_SLOTS, title="Particles to classify")
    job.connect(INPUT_NAME, args.source_job, args.source_output)
    job.add_output("particle", PARTICLES_OUTPUT, slots=["alignments2D"], passthrough=INPUT_NAME,
                   title="Particles with 2D classes")
    job.add_output("template", TEMPLATES_OUTPUT, slots=["blob"], title="2D class averages")
    with job.run():
        particles = job.load_input(INPUT_NAME, INPUT_SLOTS)
        job_dir, project_dir = _folder(job), _folder(project)
        cfg = classify_config(write_input(particles, job_dir), project_dir, job_dir, args)
        setup_logging(Path(f"{cfg.output_prefix}_run.log"))
        job.log(f"cryo-drvae: classifying {len(particles)} particles into {args.K} classes")
        pipeline.run(cfg)
        ours_particles, ours_templates = job_outputs(cfg.output_prefix, project_dir)
        job.save_output(PARTICLES_OUTPUT, fill_output(job.alloc_output(PARTICLES_OUTPUT, particles),
                                                      ours_particles, match_uid=True))
        job.save_output(TEMPLATES_OUTPUT, fill_output(job.alloc_output(TEMPLATES_OUTPUT, len(ours_templates)),
                                                      ours_templates),
                        image=f"{cfg.output_prefix}_classes.png")
    return job.uid


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from cryosparc.tools import CryoSPARC

    try:
        cs = CryoSPARC(base_url=args.base_url) if args.base_url else CryoSPARC()
        uid = run_external_job(cs, args)
    except CryoDrvaeError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("External job %s completed", uid)
    return 0


def _folder(controller: Any) -> Path:
    """``.dir`` of a job or project: a property in cryosparc-tools 5, a method in 4."""
    folder = controller.dir
    return Path(str(folder() if callable(folder) else folder))


def _project_relative(path: Path, project_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(project_dir.resolve()))
    except ValueError:
        raise CryoDrvaeError(f"{path}: not inside the cryoSPARC project folder {project_dir}; "
                             f"write the outputs inside the job folder") from None


if __name__ == "__main__":
    sys.exit(main())
