"""The RELION-flag policy shared by classify and the External-job wrapper."""

from __future__ import annotations

import pytest

from cryo_drvae.errors import ConfigError
from cryo_drvae.relion_flags import FLAG_NAMES, IGNORED, sort_extra_arguments


def test_ignored_flags_take_their_values_and_unknown_ones_keep_theirs():
    extra = sort_extra_arguments(["stray", "--ctf", "--tau2_fudge", "-1", "--pool=3", "--dont_check_norm",
                                  "--in_mics", "a.star", "b.star", "--zero_mask"])
    assert extra.ignored == ["--ctf", "--tau2_fudge -1", "--pool=3", "--zero_mask"]
    assert extra.not_needed == ["--dont_check_norm"]
    assert extra.unknown == ["stray", "--in_mics a.star b.star"]


def test_unknown_flags_fail_only_when_strict():
    extra = sort_extra_arguments(["--KK", "3"])
    with pytest.raises(ConfigError, match="--KK 3"):
        extra.report(strict=True)
    extra.report(strict=False)                     # the wrapper: a warning


def test_relion_names_with_a_meaning_are_not_in_the_ignored_list():
    meaningful = {flag for names in FLAG_NAMES.values() for flag in names}
    assert {"--K", "--nr_classes", "--iter", "--offset_range", "--angpix", "--random_seed"} <= meaningful
    assert not meaningful & set(IGNORED)
    assert {"--ctf", "--tau2_fudge", "--pool", "--zero_mask", "--flatten_solvent"} <= set(IGNORED)
    assert IGNORED["--tau2_fudge"] and not IGNORED["--ctf"]     # takes a value / a bare flag
