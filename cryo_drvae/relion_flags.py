"""One policy for RELION ``relion_refine`` flags, shared by ``cryo-drvae classify`` and the
RELION External-job wrapper (``cryo-drvae-relion``).

A flag copied from a RELION Class2D command is either

* **accepted** with RELION's meaning: ``--K``/``--nr_classes``, ``--iter``, ``--particle_diameter``,
  ``--psi_step``, ``--offset_range`` (shift search, px), ``--angpix`` (for STAR files without a pixel
  size), ``--random_seed``, ``--j``, ``--gpu``, ``--preread_images``, ``--scratch_dir``;
* **accepted and not needed** here (``--dont_check_norm``, ``--pipeline_control``): no warning;
* **warned about and ignored**: every other RELION flag (``--ctf``, ``--tau2_fudge``, ``--pool``,
  ``--zero_mask``, ...), with its value when it takes one.

A flag that is neither ours nor RELION's is an error for ``classify`` (a typo must not be
ignored) and a warning for the wrapper (RELION passes input-node flags such as ``--in_mics``).

>>> extra = sort_extra_arguments(["--ctf", "--tau2_fudge", "2", "--dont_check_norm"])
>>> extra.ignored, extra.unknown
(['--ctf', '--tau2_fudge 2'], [])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ConfigError

logger = logging.getLogger(__name__)

#: Every spelling of a config field on the command line (ours, then RELION's), the first the main
#: name; other fields are spelt ``--<field>``. ``classify`` and the wrapper both take them from here.
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "n_classes": ("--K", "--nr_classes", "--n_classes"),
    "n_rounds": ("--iter", "--n_rounds"),
    "max_shift_px": ("--max_shift_px", "--offset_range"),
    "pixel_size": ("--angpix", "--pixel_size"),
    "seed": ("--seed", "--random_seed"),
}

#: RELION flags accepted without effect, and why nothing is needed.
NOT_NEEDED: dict[str, tuple[bool, str]] = {
    "--dont_check_norm": (False, "cryo-drvae whitens the images itself and does not require normalised ones"),
    "--pipeline_control": (True, "cryo-drvae reports through RELION's marker files in the job folder"),
}

# relion_refine flags (3.1.3 --help, plus 4.0/5.0 additions) that have no counterpart here:
# name -> takes a value. Taken from the flags' listed defaults ("(false)" = bare flag).
_VALUE = "V"
_IGNORED_SPEC = """
--tau2_fudge:V --zero_mask:F --flatten_solvent:F --solvent_mask:V --solvent_mask2:V --lowpass_mask:V
--lowpass:V --tau:V --local_symmetry:V --split_random_halves:F --low_resol_join_halves:V --ref:V
--denovo_3dref:F --offset:V --firstiter_cc:F --ini_high:V --oversampling:V --healpix_order:V
--limit_tilt:V --sym:V --relax_sym:V --offset_step:V --helical_offset_step:V --perturb:V
--auto_refine:F --auto_local_healpix_order:V --sigma_ang:V --sigma_rot:V --sigma_tilt:V --sigma_psi:V
--skip_align:F --skip_rotate:F --bimodal_psi:F --helix:F --ignore_helical_symmetry:F --fourier_mask:V
--ctf:F --pad_ctf:F --ctf_intact_first_peak:F --ctf_corrected_ref:F --ctf_phase_flipped:F
--only_flip_phases:F --norm:F --scale:F --no_norm:F --no_scale:F --sgd:F --stochastic_em:F
--sgd_ini_iter:V --sgd_fin_iter:V --sgd_inbetween_iter:V --sgd_ini_resol:V --sgd_fin_resol:V
--sgd_ini_subset:V --sgd_fin_subset:V --mu:V --sgd_stepsize:V --sgd_write_iter:V --pool:V
--dont_combine_weights_via_disc:F --onthefly_shifts:F --no_parallel_disc_io:F --keep_free_scratch:V
--reuse_scratch:F --keep_scratch:F --fast_subsets:F --free_gpu_memory:V --pad:V --ref_angpix:V
--NN:F --r_min_nn:V --verb:V --coarse_size:V --adaptive_fraction:V --maskedge:V --fix_sigma_noise:F
--fix_sigma_offset:F --incr_size:V --strict_highres_exp:V --strict_lowres_exp:V --always_cc:F
--solvent_correct_fsc:F --skip_maximize:F --failsafe_threshold:V --external_reconstruct:F
--auto_iter_max:V --auto_ignore_angles:F --auto_resol_angles:F --allow_coarser_sampling:F
--trust_ref_size:F --maxsig:V --skip_gridding:F
--grad:F --grad_em_iters:V --grad_ini_frac:V --grad_fin_frac:V --grad_ini_subset:V --grad_fin_subset:V
--grad_stepsize:V --grad_write_iter:V --class_inactivity_threshold:V --center_classes:F --blush:F
"""
IGNORED: dict[str, bool] = {name: kind == _VALUE for name, _, kind in
                            (item.partition(":") for item in _IGNORED_SPEC.split())}

#: Why a few of the ignored flags are not needed (the rest: "no equivalent in cryo-drvae").
IGNORED_WHY: dict[str, str] = {
    "--ctf": "CTF correction is on unless --no_ctf",
    "--tau2_fudge": "the Wiener filter uses the measured signal power",
    "--pool": "batches are sized automatically",
    "--zero_mask": "the noise outside the particle is whitened, not zeroed",
    "--flatten_solvent": "references are solvent-masked automatically",
    "--offset_step": "shifts are searched in 1-pixel steps of the working box",
    "--oversampling": "poses are searched on one grid (--psi_step, 1-pixel shifts)",
    "--norm": "no per-particle scale is refined",
    "--scale": "no per-group scale is refined",
}


@dataclass
class ExtraArguments:
    """Command-line tokens left over after our own options, sorted by the policy."""

    ignored: list[str] = field(default_factory=list)      # RELION flags (with value) that do nothing here
    not_needed: list[str] = field(default_factory=list)   # RELION flags accepted silently
    unknown: list[str] = field(default_factory=list)      # neither ours nor RELION's (or stray values)

    def refuse_unknown(self, command: str = "cryo-drvae classify") -> None:
        """Raise a ConfigError naming the unknown flags, if any."""
        if self.unknown:
            raise ConfigError(f"unknown option(s) {' '.join(self.unknown)}: neither a {command} option "
                              f"nor a RELION relion_refine flag; see {command} --help")

    def report(self, strict: bool, command: str = "cryo-drvae classify") -> None:
        """Log the ignored flags; with ``strict``, raise for unknown ones, else warn."""
        if self.ignored:
            notes = [f"{flag} ({IGNORED_WHY[flag.split()[0]]})" if flag.split()[0] in IGNORED_WHY else flag
                     for flag in self.ignored]
            logger.warning("ignoring RELION option(s) with no equivalent in cryo-drvae: %s", "; ".join(notes))
        for flag in self.not_needed:
            logger.debug("%s accepted: %s", flag, NOT_NEEDED[flag.split()[0]][1])
        if strict:
            self.refuse_unknown(command)
        if self.unknown:
            logger.warning("ignoring argument(s) cryo-drvae does not know: %s", " ".join(self.unknown))


def sort_extra_arguments(tokens: Sequence[str]) -> ExtraArguments:
    """Sort leftover tokens into ignored RELION flags, silently accepted ones and unknown ones.

    A RELION flag that takes a value swallows the next token unless it starts with ``--``
    (``--tau2_fudge 2``, ``--tau2_fudge=2``); values after an unknown flag stay with it.
    """
    extra = ExtraArguments()
    tokens = list(tokens)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, has_equals, _ = token.partition("=")
        if name in IGNORED:
            takes_value: bool | None = IGNORED[name]
        else:
            takes_value = NOT_NEEDED[name][0] if name in NOT_NEEDED else None
        i += 1
        if not name.startswith("--"):
            extra.unknown.append(token)                    # a value without a flag
            continue
        shown = token
        if takes_value is None:                            # unknown: keep its values with it
            while i < len(tokens) and not tokens[i].startswith("--"):
                shown += f" {tokens[i]}"
                i += 1
            extra.unknown.append(shown)
            continue
        if takes_value and not has_equals and i < len(tokens) and not tokens[i].startswith("--"):
            shown += f" {tokens[i]}"
            i += 1
        (extra.not_needed if name in NOT_NEEDED else extra.ignored).append(shown)
    return extra
