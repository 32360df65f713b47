"""Typed run configuration: one frozen dataclass per concern, validated on creation.

``RunConfig.from_options(...)`` builds a config from flat CLI-style options, and
``to_yaml``/``from_yaml`` round-trip it exactly (unknown keys are an error).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


#: Command-line flag of each config field where it is not ``--<field>`` (messages name flags).
FLAGS = {"particles_star": "--i", "output_prefix": "--o", "n_classes": "--K", "n_rounds": "--iter",
         "threads": "--j", "epochs_initial": "--epochs", "use_drvae": "--drvae", "use_ctf": "--no_ctf",
         "continue_run": "--continue", "device": "--gpu"}


def flag(field_name: str) -> str:
    """The command-line flag that sets a config field: ``n_classes`` -> ``--K``."""
    return FLAGS.get(field_name, f"--{field_name}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


#: ``particle_diameter`` 0 means this fraction of the box (extraction boxes are ~1.5-2x the particle).
DIAMETER_FRACTION = 0.6


def parse_gpu(gpu: str | None) -> str:
    """``--gpu`` (RELION-style, the CLI's and the External job's) -> device: None -> ``cpu``;
    ``""`` -> ``cuda:0``; ``"0,1"`` or ``"0:1"`` -> ``cuda:0,1`` (under torchrun rank r uses the r-th id).

    Only the spelling is checked here; whether CUDA and those GPUs exist is checked when the run
    starts (``runtime.resolve_device``): a missing GPU is an error, never a silent CPU run.
    """
    if gpu is None:
        return "cpu"
    ids = [t for t in re.split(r"[,:\s]+", gpu) if t]
    if not all(t.isdigit() for t in ids):
        raise ConfigError(f"--gpu: expected device numbers such as '0' or '0,1', got {gpu!r}")
    return "cuda:" + ",".join(str(int(t)) for t in ids or ["0"])


def gpu_ids(device: str) -> list[int]:
    """GPU numbers a device string names: ``cuda:0,1`` -> [0, 1], ``cuda`` -> [0], ``cpu`` -> []."""
    if not device.startswith("cuda"):
        return []
    return [int(i) for i in device.partition(":")[2].split(",") if i.strip()] or [0]


@dataclass(frozen=True)
class DataConfig:
    """Where the particles are and how they are prepared."""

    particles_star: str = ""
    data_dir: str | None = None        # folder image paths are relative to (default: working dir)
    particle_diameter: float = 0.0     # Å; 0 = DIAMETER_FRACTION x box
    pixel_size: float = 0.0            # Å/px for STAR files without one (RELION's --angpix); 0 = from the STAR
    working_box: int = 0               # px after Fourier cropping; 0 = automatic
    use_ctf: bool = True
    preread_images: bool = False       # keep the working images in RAM instead of streaming them
    scratch_dir: str | None = None     # where streamed working images go (default: next to the outputs)
    cs_out: bool = False               # also write cryoSPARC outputs for a STAR input (always for a .cs)

    def __post_init__(self) -> None:
        _require(self.particle_diameter >= 0, f"--particle_diameter must be >= 0 Å, got {self.particle_diameter}")
        _require(self.pixel_size >= 0, f"--angpix must be >= 0 Å/px, got {self.pixel_size}")
        _require(self.working_box == 0 or self.working_box >= 16,
                 f"--working_box must be 0 (auto) or >= 16 px, got {self.working_box}")


@dataclass(frozen=True)
class TrainConfig:
    """DRVAE network and its training schedule."""

    use_drvae: bool = False            # see docs/method.md: measured, not a default win
    latent_dim: int = 16
    channels: int = 16
    epochs_initial: int = 6
    epochs_per_round: int = 2
    batch_size: int = 128
    learning_rate: float = 2e-3
    kl_weight: float = 1e-3
    pseudo_target_weight: float = 0.5

    def __post_init__(self) -> None:
        _require(self.latent_dim >= 1, f"--latent_dim must be >= 1, got {self.latent_dim}")
        _require(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        _require(self.epochs_initial >= 0 and self.epochs_per_round >= 0,
                 "--epochs (epochs_initial) and --epochs_per_round must be >= 0")
        _require(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        _require(0.0 <= self.pseudo_target_weight <= 1.0,
                 f"--pseudo_target_weight must be in [0, 1], got {self.pseudo_target_weight}")


@dataclass(frozen=True)
class ClusterConfig:
    """BSK-means++ and the outer alignment/classification rounds."""

    n_classes: int = 50
    balance: float = 0.2               # smallest class >= balance * N / K; 0 = plain K-means++
    reliable_fraction: float = 0.5     # share of each class used as pseudo targets
    n_rounds: int = 8                  # --iter: upper bound on outer rounds
    tolerance: float = 0.01            # stop when fewer than this fraction of labels change
    psi_step: float = 10.0             # degrees
    max_shift_px: float = 0.0          # px at the original box; 0 = 10% of the box
    init_particles: int = 0            # particles the classes are grown on; 0 = max(5000, 100 K)
    reference_filter: str = "ml_common"  # class references: "ml_common" (ML, one band limit), "ml" or "wiener"
    split_merge: bool = True           # split-and-merge moves at K, kept when the likelihood rises
    move_criterion: str = "likelihood"  # what keeps a move: "likelihood" or "evidence" (references integrated out)
    search_margin: float = 10.0        # nats: classes this close to a particle's best on the low frequencies are scored exactly; 0 = all

    def initial_subset_size(self, n_particles: int) -> int:
        wanted = self.init_particles or max(5000, 100 * self.n_classes)
        return min(n_particles, wanted)

    def __post_init__(self) -> None:
        _require(self.n_classes >= 1, f"--K must be >= 1, got {self.n_classes}")
        _require(0.0 <= self.balance <= 1.0, f"--balance must be in [0, 1], got {self.balance}")
        _require(0.0 < self.reliable_fraction <= 1.0,
                 f"--reliable_fraction must be in (0, 1], got {self.reliable_fraction}")
        _require(self.n_rounds >= 1, f"--iter must be >= 1, got {self.n_rounds}")
        _require(0.0 < self.psi_step <= 90.0, f"--psi_step must be in (0, 90] degrees, got {self.psi_step}")
        _require(self.max_shift_px >= 0, f"--max_shift_px must be >= 0, got {self.max_shift_px}")
        _require(self.move_criterion in ("likelihood", "evidence"),
                 f"--move_criterion must be 'likelihood' or 'evidence', got {self.move_criterion!r}")
        _require(self.reference_filter in ("ml", "ml_common", "wiener"),
                 f"--reference_filter must be 'ml_common', 'ml' or 'wiener', got {self.reference_filter!r}")
        _require(self.search_margin >= 0, f"--search_margin must be >= 0, got {self.search_margin}")
        _require(self.init_particles >= 0, f"--init_particles must be >= 0, got {self.init_particles}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one classification run needs."""

    output_prefix: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0
    threads: int = 1
    device: str = "cpu"                # "cpu", "cuda" or "cuda:N"
    continue_run: bool = False
    overwrite: bool = False            # replace the outputs of an earlier run on this prefix

    def __post_init__(self) -> None:
        _require(self.threads >= 1, f"--j must be >= 1, got {self.threads}")
        _require(self.device == "cpu" or self.device.startswith("cuda"),
                 f"--gpu: device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @classmethod
    def from_options(cls, **options: Any) -> RunConfig:
        """Build from flat option names; each goes to the section that has that field."""
        sections: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "cluster": {}}
        top: dict[str, Any] = {}
        owners = {name: section for section, klass in
                  (("data", DataConfig), ("train", TrainConfig), ("cluster", ClusterConfig))
                  for name in (f.name for f in dataclasses.fields(klass))}
        top_names = {f.name for f in dataclasses.fields(cls)}
        for name, value in options.items():
            if value is None:
                continue
            if name in owners:
                sections[owners[name]][name] = value
            elif name in top_names:
                top[name] = value
            else:
                raise ConfigError(f"unknown option {name!r}")
        return cls(data=DataConfig(**sections["data"]), train=TrainConfig(**sections["train"]),
                   cluster=ClusterConfig(**sections["cluster"]), **top)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> RunConfig:
        raw = yaml.safe_load(text) or {}
        sub = {"data": DataConfig, "train": TrainConfig, "cluster": ClusterConfig}
        try:
            parts = {k: sub[k](**v) if k in sub else v for k, v in raw.items()}
            return cls(**parts)
        except TypeError as exc:
            raise ConfigError(f"config.yaml: {exc}; remove unknown keys") from None

    def diameter_angst(self, box_size: int, pixel_size: float) -> float:
        """The particle diameter in Å: ``--particle_diameter``, else ``DIAMETER_FRACTION`` x box."""
        return self.data.particle_diameter or DIAMETER_FRACTION * box_size * pixel_size

    @property
    def output_dir(self) -> Path:
        return Path(self.output_prefix).parent
