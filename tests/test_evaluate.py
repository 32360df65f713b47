"""Tests of scoring a classification against simulated truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_drvae.errors import InputFileError
from cryo_drvae.evaluate import evaluate_run, format_scores, normalise_image_name, score_labels


def test_permuted_labels_score_one():
    true = np.repeat([1, 2, 3, 4], 25)
    relabel = {1: 7, 2: 3, 3: 9, 4: 1}
    scores = score_labels(true, [relabel[t] for t in true])
    assert (scores.accuracy, scores.nmi, scores.ari) == (1.0, 1.0, 1.0)
    assert (scores.n_true_classes, scores.n_pred_classes, scores.smallest_class, scores.largest_class) == (4, 4, 25, 25)


def test_known_confusion_gives_hand_computed_accuracy():
    # true A: 10 -> pred x 8, y 2 ; true B: 10 -> pred y 7, z 3 ; true C: 5 -> pred z 5
    true = ["A"] * 10 + ["B"] * 10 + ["C"] * 5
    pred = ["x"] * 8 + ["y"] * 2 + ["y"] * 7 + ["z"] * 3 + ["z"] * 5
    scores = score_labels(true, pred)
    assert scores.accuracy == pytest.approx((8 + 7 + 5) / 25)
    assert (scores.smallest_class, scores.largest_class) == (8, 9)


def test_more_predicted_classes_leave_the_unmatched_wrong():
    true = [1] * 10 + [2] * 10
    pred = [1] * 10 + [2] * 6 + [3] * 4            # class 3 has no partner
    scores = score_labels(true, pred)
    assert scores.accuracy == pytest.approx(16 / 20)
    assert (scores.n_true_classes, scores.n_pred_classes) == (2, 3)
    assert format_scores(scores).endswith("(20 particles, 2 classes, 3 predicted)")


def test_format_scores():
    scores = score_labels([1, 1, 2, 2], [2, 2, 1, 1])
    assert format_scores(scores) == "accuracy 1.000  NMI 1.000  ARI 1.000  (4 particles, 2 classes)"


def test_normalise_image_name():
    assert normalise_image_name("000012@Particles/x.mrcs") == normalise_image_name("12@./Particles/x.mrcs")
    assert normalise_image_name("12@Particles/x.mrcs") != normalise_image_name("12@Particles/y.mrcs")


def _write_pair(tmp_path, n=30, with_class=True):
    names = [f"{i + 1:06d}@Particles/stack_001.mrcs" for i in range(n)]
    classes = np.arange(n) % 3 + 1
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"image_name": names, "class": classes}).to_csv(truth, index=False)
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1}@Particles/stack_001.mrcs" for i in order]})
    if with_class:
        particles["rlnClassNumber"] = (classes[order] % 3) + 5      # a relabeling
        particles.loc[0, "rlnClassNumber"] = 99                     # one particle alone: wrong
    data = tmp_path / "run_data.star"
    starfile.write({"optics": pd.DataFrame({"rlnOpticsGroup": [1]}), "particles": particles}, data)
    return truth, data


def test_evaluate_run_matches_shuffled_rows_and_padding(tmp_path):
    truth, data = _write_pair(tmp_path)
    scores = evaluate_run(truth, data)
    assert scores.n_particles == 30
    assert scores.accuracy == pytest.approx(29 / 30)


def test_missing_class_column_is_an_input_error(tmp_path):
    truth, data = _write_pair(tmp_path, with_class=False)
    with pytest.raises(InputFileError, match=r"run_data\.star.*rlnClassNumber"):
        evaluate_run(truth, data)


def test_image_missing_from_data_star_is_an_input_error(tmp_path):
    truth, data = _write_pair(tmp_path)
    blocks = starfile.read(data, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[1:]
    starfile.write(blocks, data)
    with pytest.raises(InputFileError, match=r"run_data\.star: 1 image\(s\) of .*truth\.csv are not listed"):
        evaluate_run(truth, data)


def test_image_missing_from_truth_is_an_input_error(tmp_path):
    truth, data = _write_pair(tmp_path)
    pd.read_csv(truth).iloc[1:].to_csv(truth, index=False)
    with pytest.raises(InputFileError, match=r"truth\.csv: 1 image\(s\) of .*run_data\.star are not listed"):
        evaluate_run(truth, data)
