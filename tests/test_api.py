"""The Python facade: ``cryo_drvae.classify`` is the CLI's classify, names load lazily."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cryo_drvae


def test_import_is_light_and_names_resolve():
    code = "import sys, cryo_drvae; assert 'torch' not in sys.modules; cryo_drvae.RunConfig; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    for name in cryo_drvae.__all__:
        assert getattr(cryo_drvae, name) is not None


@pytest.mark.slow
def test_classify_from_python(small_set, tmp_path):
    result = cryo_drvae.classify(small_set.star_path, tmp_path / "run", n_classes=4, threads=2, n_rounds=2,
                                 psi_step=12.0)
    assert result.paths["data_star"].is_file() and 1 <= result.n_rounds <= 2
    scores = cryo_drvae.evaluate_run(small_set.truth_path, result.paths["data_star"])
    assert len(result.result.labels) == 240 and np.unique(result.result.labels).size == 4
    assert scores.accuracy >= 0.85 and scores.n_particles == 240
