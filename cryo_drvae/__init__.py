"""cryo-drvae: unsupervised 2D classification of cryo-EM particles (DRVAE + BSK-means++).

Python API (for notebooks); the same as ``cryo-drvae classify`` with the flags as keywords::

    import cryo_drvae
    result = cryo_drvae.classify("Extract/job005/particles.star", "Class2D/run", n_classes=50, threads=8)
    result.result.labels          # (n,) 0-based classes, in STAR row order
    result.paths["data_star"]     # Class2D/run_data.star
    result.n_rounds               # refinement rounds run

    sim = cryo_drvae.simulate_dataset(cryo_drvae.SimulationConfig(n_classes=10, n_particles=2000), "sim")
    cryo_drvae.evaluate_run(sim.truth_path, "Class2D/run_data.star")   # accuracy, NMI, ARI

Keywords are the fields of :class:`RunConfig`'s sections (``n_classes``, ``n_rounds``,
``particle_diameter`` in Å, ``balance``, ``pixel_size``, ``device="cuda:0"``, ...). Names are
imported on first use, so ``import cryo_drvae`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "config", "DataConfig": "config", "TrainConfig": "config", "ClusterConfig": "config",
    "run": "pipeline", "RunResult": "pipeline",
    "read_particles": "star_io", "write_particles": "star_io", "ParticleTable": "star_io",
    "ParticleStack": "stack",
    "SimulationConfig": "simulate", "simulate_dataset": "simulate",
    "evaluate_run": "evaluate", "score_labels": "evaluate",
    "CryoDrvaeError": "errors", "InputFileError": "errors", "ConfigError": "errors",
}
__all__ = ["__version__", "classify", *_EXPORTS]

if TYPE_CHECKING:
    from .pipeline import RunResult


def classify(particles_star: str, output_prefix: str, **options: Any) -> RunResult:
    """Classify ``particles_star`` and write ``<output_prefix>_data.star`` etc.; returns the RunResult.

    ``options`` are :meth:`RunConfig.from_options` keywords (config field names, e.g.
    ``n_classes=50, n_rounds=8, threads=4``). Raises :class:`CryoDrvaeError` on bad input.
    """
    from .config import RunConfig
    from .pipeline import run
    return run(RunConfig.from_options(particles_star=str(particles_star), output_prefix=str(output_prefix),
                                      **options))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'cryo_drvae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
