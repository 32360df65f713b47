"""Checkpoints that refuse to resume a different run.

A checkpoint is a plain dict of tensors, numbers and strings (loaded with
``torch.load(..., weights_only=True)``, so it cannot run code). Besides the round state it
records every setting that changes the result and a fingerprint of the input (path, particle
count, SHA-256 of the STAR file); ``--continue`` with anything different is refused with the
flag to fix. ``--iter``, ``--j``, ``--gpu``, ``--scratch_dir`` and ``--preread_images`` may
change between the interrupted and the resumed run.

>>> save_checkpoint(path, state_dict, settings(cfg), input_fingerprint(table))
>>> state = load_checkpoint(path, settings(cfg), input_fingerprint(table))

A run's ``RoundState`` goes to ``<o>_checkpoint.pt`` after every round, as such a plain dict:

>>> save_round_state(cfg, state, comm, fingerprint)
>>> state = load_round_state(cfg, fingerprint)      # None when there is no checkpoint yet
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import RunConfig, flag
from .distributed import Comm
from .errors import ConfigError, InputFileError

if TYPE_CHECKING:
    from .refine import Assignment

logger = logging.getLogger(__name__)

FORMAT = 2
#: Config fields that do not change the result, so a resumed run may change them.
FREE_FIELDS = {"output_prefix", "threads", "device", "continue_run", "overwrite", "n_rounds",
               "scratch_dir", "preread_images", "data_dir", "particles_star"}


def settings(cfg: RunConfig) -> dict[str, Any]:
    """Every result-changing setting, flat: ``{"seed": 0, "n_classes": 4, "use_ctf": True, ...}``."""
    flat: dict[str, Any] = {}
    for name, value in dataclasses.asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        flat.update((k, v) for k, v in items if k not in FREE_FIELDS)
    return flat


def input_fingerprint(star_path: str | os.PathLike, n_particles: int) -> dict[str, Any]:
    """``{"path", "n_particles", "sha256"}`` of a particles STAR file."""
    digest = hashlib.sha256()
    with open(star_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(star_path), "n_particles": int(n_particles),
            "sha256": digest.hexdigest()}


def save_checkpoint(path: Path, state: dict[str, Any], run_settings: dict[str, Any],
                    fingerprint: dict[str, Any]) -> None:
    """Write atomically; a full disk is one clear error, the previous checkpoint stays."""
    from .io_utils import atomic_path

    payload = {"format": FORMAT, "state": state, "settings": run_settings, "input": fingerprint}
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:      # torch's zip writer reports a full disk this way
            raise OSError(str(exc).splitlines()[0]) from None


def load_checkpoint(path: Path, run_settings: dict[str, Any],
                    fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The saved round state, after checking it belongs to this run.

    Raises
    ------
    ConfigError
        A result-changing setting differs (the message names the flag and both values).
    InputFileError
        The checkpoint is unreadable or from an older version, or the input differs.
    """
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - pickle, zip and format errors alike
        raise InputFileError(f"{path}: cannot be read as a cryo-drvae checkpoint "
                             f"({str(exc).splitlines()[0][:120]}); rerun without --continue "
                             f"and with --overwrite to start again") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise InputFileError(f"{path}: checkpoint from another cryo-drvae version; rerun without "
                             f"--continue and with --overwrite to start again")
    _check_input(path, saved["input"], fingerprint)
    _check_settings(path, saved["settings"], run_settings)
    return saved["state"]


def _check_input(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    if saved.get("sha256") == now["sha256"] and saved.get("n_particles") == now["n_particles"]:
        return
    raise InputFileError(f"{path}: made from --i {saved.get('path')} ({saved.get('n_particles')} particles), "
                         f"but --i {now['path']} ({now['n_particles']} particles) "
                         f"{'is a different file' if saved.get('path') != now['path'] else 'has changed since'}; "
                         f"resume with the same --i, or rerun without --continue and with --overwrite")


def _check_settings(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    for name in sorted(set(saved) | set(now)):
        before, after = saved.get(name), now.get(name)
        if before != after:
            raise ConfigError(f"{path}: checkpoint was made with {_show(name, before)}, this run has "
                              f"{_show(name, after)}; resume with {_show(name, before)}, or rerun "
                              f"without --continue and with --overwrite")


def _show(name: str, value: Any) -> str:
    """How a setting reads on the command line: ``--seed 3``, ``--no_ctf``, ``no --drvae``."""
    if name == "use_ctf":
        return "no --no_ctf" if value else "--no_ctf"
    if isinstance(value, bool):
        return flag(name) if value else f"no {flag(name)}"
    return f"{flag(name)} {value}"


@dataclasses.dataclass
class RoundState:
    """What a checkpoint holds between rounds."""

    round: int
    assignment: Assignment
    references: torch.Tensor
    log_prior: np.ndarray
    history: list[dict]
    denoiser: dict | None


def checkpoint_path(cfg: RunConfig) -> Path:
    return Path(f"{cfg.output_prefix}_checkpoint.pt")


def save_round_state(cfg: RunConfig, state: RoundState, comm: Comm = Comm(),
                     fingerprint: dict | None = None) -> None:
    """The round state as a plain dict, with the settings and input it belongs to (rank 0 writes)."""
    if not comm.is_main:
        return
    save_checkpoint(checkpoint_path(cfg), _plain(state), settings(cfg), fingerprint or {})


def load_round_state(cfg: RunConfig, fingerprint: dict) -> RoundState | None:
    """The last round's state if ``<o>_checkpoint.pt`` exists and belongs to this run and input."""
    path = checkpoint_path(cfg)
    if not path.exists():
        logger.info("--continue: no checkpoint at %s, starting from the beginning", path)
        return None
    state = _round_state(load_checkpoint(path, settings(cfg), fingerprint))
    logger.info("--continue: resuming after round %d from %s", state.round, path)
    return state


def _plain(state: RoundState) -> dict[str, Any]:
    a = state.assignment
    return {"round": state.round, "labels": torch.from_numpy(np.asarray(a.labels, np.int64)),
            "pose": torch.from_numpy(np.asarray(a.pose, np.int64)),
            "cost": torch.from_numpy(np.asarray(a.cost, np.float64)),
            "confidence": torch.from_numpy(np.asarray(a.confidence, np.float64)),
            "references": state.references.detach().cpu(),
            "log_prior": torch.from_numpy(np.asarray(state.log_prior, np.float64)),
            "history": [{k: v.item() if hasattr(v, "item") else v for k, v in e.items()}
                        for e in state.history],
            "denoiser": state.denoiser}


def _round_state(saved: dict[str, Any]) -> RoundState:
    from .refine import Assignment   # here, so that this module does not import the refinement

    assignment = Assignment(saved["labels"].numpy(), saved["pose"].numpy(), saved["cost"].numpy(),
                            saved["confidence"].numpy())
    return RoundState(int(saved["round"]), assignment, saved["references"], saved["log_prior"].numpy(),
                      list(saved["history"]), saved["denoiser"])
