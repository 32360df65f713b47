"""Command line: ``cryo-drvae classify | simulate | evaluate`` (RELION-style flags).

Each command builds a config, configures logging (stderr + a log file) and calls one library
function; a ``CryoDrvaeError`` becomes one clean error line and exit status 1.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .config import RunConfig
from .errors import CryoDrvaeError
from .signals import Terminated, terminate_as_interrupt

logger = logging.getLogger("cryo_drvae")


def setup_logging(log_file: Path | None = None, verbose: bool = False, append: bool = False) -> None:
    """Info to stderr (and to ``log_file``, started afresh unless ``append``); library modules
    only create loggers."""
    root = logging.getLogger("cryo_drvae")
    for old in root.handlers:
        old.close()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a" if append else "w"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.propagate = False


def _to_log_file(message: str) -> None:
    """Also put an error that ends the run into the run's log file (stderr gets it from click)."""
    for handler in logging.getLogger("cryo_drvae").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logging.makeLogRecord({"name": "cryo_drvae", "levelno": logging.ERROR,
                                                  "levelname": "ERROR", "msg": message}))


def clean_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one ``Error: ...`` line and exit status 1 (also in the log file);
    SIGINT/SIGTERM into one line and status 130/143."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CryoDrvaeError as exc:
            _to_log_file(str(exc))
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt as exc:
            message = interrupted_message(exc, kwargs.get("output_prefix"))
            _to_log_file(message)
            click.echo(f"Error: {message}", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)
    return wrapper


def interrupted_message(exc: KeyboardInterrupt, prefix: str | None) -> str:
    what = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT (Ctrl-C)"
    if prefix is None:
        return f"interrupted by {what}"
    checkpoint = Path(f"{prefix}_checkpoint.pt")
    if checkpoint.exists():
        return (f"interrupted by {what}; scratch files removed, {checkpoint} keeps the last finished "
                f"round: rerun the same command with --continue to resume")
    return f"interrupted by {what} before the first round finished; scratch files removed: rerun the command"


def parse_gpu(gpu: str | None) -> str:
    """RELION's ``--gpu "0,1"`` -> ``cuda:0,1`` ("" = GPU 0; under torchrun rank r uses the r-th id);
    None -> CPU."""
    if gpu is None:
        return "cpu"
    ids = [t.strip() for t in gpu.replace(":", ",").split(",") if t.strip()]
    return "cuda:" + ",".join(str(int(t)) for t in ids or ["0"])


@click.group()
@click.version_option(__version__)
def main() -> None:
    """cryo-drvae: unsupervised 2D classification of cryo-EM particles (DRVAE + BSK-means++)."""


@main.command()
@click.option("--i", "particles_star", required=True, type=click.Path(dir_okay=False),
              help="Input particles STAR file (RELION 3.0 or 3.1+).")
@click.option("--o", "output_prefix", required=True,
              help="Output prefix, e.g. Class2D/job010/run: writes <o>_data.star, <o>_model.star, ...")
@click.option("--K", "n_classes", type=int, default=50, show_default=True, help="Number of classes.")
@click.option("--j", "threads", type=int, default=1, show_default=True, help="CPU threads.")
@click.option("--particle_diameter", type=float, default=0.0, show_default=True,
              help="Particle diameter in Å (0 = 60% of the box).")
@click.option("--iter", "n_rounds", type=int, default=None, help="Maximum number of classification rounds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (runs are reproducible).")
@click.option("--gpu", default=None, is_flag=False, flag_value="", help='Use a GPU: "0" or RELION-style "0,1".')
@click.option("--continue", "continue_run", is_flag=True, help="Resume from the last round's checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run on this --o.")
@click.option("--balance", type=float, default=None,
              help="BSK-means++ balance: smallest class >= balance * N / K (0 = plain K-means++).")
@click.option("--drvae/--no_drvae", "use_drvae", default=None,
              help="Start from DRVAE-denoised BSK-means++ (the paper's step 2) instead of class growing.")
@click.option("--no_ctf", is_flag=True, help="Ignore CTF parameters (e.g. for phase-flipped data).")
@click.option("--data_dir", default=None, help="Folder image paths are relative to (default: working dir).")
@click.option("--working_box", type=int, default=None, help="Working box in px after Fourier cropping.")
@click.option("--psi_step", type=float, default=None, help="In-plane angular step in degrees.")
@click.option("--preread_images", is_flag=True, default=None,
              help="Keep the working images in RAM (faster when they fit) instead of streaming them.")
@click.option("--scratch_dir", default=None, help="Folder for streamed working images (default: next to --o).")
@click.option("--init_particles", type=int, default=None,
              help="Particles the first classes are found on (0 = max(5000, 100 K)).")
@click.option("--epochs", "epochs_initial", type=int, default=None, help="Initial DRVAE epochs.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
@clean_errors
def classify(verbose: bool, gpu: str | None, no_ctf: bool, **options: Any) -> None:
    """Classify particles: writes <o>_data.star, _model.star, _class_averages.mrcs and PNGs."""
    from .distributed import is_main_process
    from .guard import claim_prefix
    from .pipeline import run

    setup_logging(None, verbose)          # until the prefix is ours, log to stderr only
    cfg = RunConfig.from_options(device=parse_gpu(gpu), use_ctf=not no_ctf,
                                 **options)
    main_rank = is_main_process()
    with claim_prefix(cfg, main_rank), terminate_as_interrupt():
        setup_logging(Path(f"{cfg.output_prefix}_run.log") if main_rank else None, verbose,
                      append=cfg.continue_run)
        result = run(cfg)
    for name, path in result.paths.items():
        click.echo(f"{name}: {path}")


@main.command()
@click.option("--o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--K", "n_classes", type=int, default=10, show_default=True, help="Number of classes.")
@click.option("--n", "n_particles", type=int, default=2000, show_default=True, help="Number of particles.")
@click.option("--snr", type=float, default=0.02, show_default=True, help="Signal-to-noise ratio.")
@click.option("--box", "box_size", type=int, default=64, show_default=True, help="Box size in px.")
@click.option("--angpix", "pixel_size", type=float, default=3.0, show_default=True, help="Pixel size in Å.")
@click.option("--shapes", "n_shapes", type=int, default=1, show_default=True, help="Distinct 3D shapes.")
@click.option("--imbalance", type=float, default=1.0, show_default=True,
              help="Largest / smallest class size.")
@click.option("--relion30", is_flag=True, help="Write a RELION 3.0-format STAR file.")
@click.option("--seed", type=int, default=0, show_default=True)
@clean_errors
def simulate(out_dir: str, **options: Any) -> None:
    """Simulate particles with known classes: particles.star, Particles/*.mrcs, truth.csv."""
    from .simulate import SimulationConfig, simulate_dataset

    setup_logging()
    result = simulate_dataset(SimulationConfig(**options), out_dir)
    click.echo(f"particles: {result.star_path}\ntruth: {result.truth_path}")


@main.command()
@click.option("--truth", "truth_csv", required=True, type=click.Path(dir_okay=False), help="truth.csv")
@click.option("--data", "data_star", required=True, type=click.Path(dir_okay=False), help="<o>_data.star")
@clean_errors
def evaluate(truth_csv: str, data_star: str) -> None:
    """Score a classification against the truth: accuracy (Hungarian), NMI, ARI."""
    from .evaluate import evaluate_run, format_scores

    click.echo(format_scores(evaluate_run(truth_csv, data_star)))


if __name__ == "__main__":
    main()
