"""Tests of the result pictures."""

from __future__ import annotations

import numpy as np
import pytest

from cryo_drvae.plots import (gallery_order, grid_shape, plot_class_gallery, plot_convergence,
                              plot_ranked_gallery, plot_side_by_side)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_gallery_order_largest_first_ties_in_class_order():
    assert gallery_order([5, 40, 0, 40, 12]).tolist() == [1, 3, 4, 0, 2]


def test_grid_shape_is_near_square():
    assert grid_shape(10) == (3, 4)
    assert grid_shape(16) == (4, 4)
    assert grid_shape(1) == (1, 1)


def test_class_gallery_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    averages = rng.normal(size=(5, 16, 16)).astype(np.float32)
    path = plot_class_gallery(averages, np.array([5, 40, 0, 40, 12]), tmp_path / "classes.png")
    assert path == tmp_path / "classes.png" and _is_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["classes.png"]       # no temporary left behind


def test_class_gallery_rejects_mismatched_counts(tmp_path):
    with pytest.raises(ValueError, match="counts"):
        plot_class_gallery(np.zeros((3, 8, 8)), np.array([1, 2]), tmp_path / "x.png")


def _curve_pixels(path, n_panels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) of the line colour's pixels in each of ``n_panels`` stacked panels."""
    from matplotlib import colors, image
    rgb = image.imread(path)[..., :3]
    line = np.array(colors.to_rgb("C0"))
    rows, cols = np.nonzero(np.abs(rgb - line).max(axis=2) < 0.05)
    edges = np.linspace(0, rgb.shape[0], n_panels + 1)
    return [(rows[(rows >= lo) & (rows < hi)], cols[(rows >= lo) & (rows < hi)])
            for lo, hi in zip(edges[:-1], edges[1:])]


def test_convergence_plot(tmp_path):
    from matplotlib import image
    falling = [{"round": r, "changed_fraction": 0.5 / r, "loss": 10.0 / r, "note": "x"} for r in range(1, 6)]
    path = plot_convergence(falling, tmp_path / "conv.png")
    assert _is_png(path)
    assert image.imread(path).shape[:2] == (2 * 200, 500)      # 5 x 2 inches per numeric key, 100 dpi
    for rows, cols in _curve_pixels(path, 2):               # both panels draw a falling curve
        assert len(rows) > 50
        assert np.corrcoef(cols, rows)[0, 1] > 0.5            # further right = lower (larger row)
    rising = [dict(h, changed_fraction=0.1 * h["round"], loss=float(h["round"])) for h in falling]
    for rows, cols in _curve_pixels(plot_convergence(rising, tmp_path / "up.png"), 2):
        assert np.corrcoef(cols, rows)[0, 1] < -0.5
    three = [dict(r, mean_cost=1.0) for r in falling]
    assert image.imread(plot_convergence(three, tmp_path / "three.png")).shape[:2] == (3 * 200, 500)
    with pytest.raises(ValueError, match="numeric"):
        plot_convergence([], tmp_path / "empty.png")


def test_side_by_side(tmp_path):
    rows = {"truth": np.zeros((4, 16, 16)), "RELION": np.ones((3, 16, 16)), "cryo-drvae": np.eye(8)[None]}
    assert _is_png(plot_side_by_side(rows, tmp_path / "side.png", title="K=4"))
    with pytest.raises(ValueError, match="truth"):
        plot_side_by_side({"truth": np.zeros((16, 16))}, tmp_path / "bad.png")


def test_gallery_titles_give_share_and_resolution():
    from cryo_drvae.plots import panel_title
    assert panel_title(2, 30, 120, 14.4) == "class 3: 30 (25.0 %)\n14 Å"
    assert panel_title(0, 0, 120, 999.0) == "class 1: 0 (0.0 %)"


def test_gallery_uses_one_intensity_scale_for_all_classes():
    from cryo_drvae.plots import common_limits
    faint = np.full((16, 16), 0.1)
    strong = np.zeros((16, 16))
    strong[4:12, 4:12] = 10.0
    empty = np.full((16, 16), 1000.0)               # an empty class must not set the scale
    low, high = common_limits(np.stack([faint, strong, empty]), np.array([5, 5, 0]))
    assert low == pytest.approx(0.0) and high == pytest.approx(10.0)


def test_scale_bar_is_a_round_length_near_a_quarter_of_the_box():
    from cryo_drvae.plots import scale_bar_angst
    assert scale_bar_angst(64, 3.0) == 20.0         # box 192 Å -> 48 Å target -> 20 Å
    assert scale_bar_angst(400, 1.0) == 100.0


def test_convergence_axes_have_plain_names(tmp_path):
    from cryo_drvae.plots import axis_label
    assert axis_label("changed_fraction") == ("labels changed (%)", 100.0)
    assert "_" not in axis_label("class_size_min")[0] and "_" not in axis_label("some_new_key")[0]
    path = plot_class_gallery(np.random.default_rng(1).normal(size=(3, 16, 16)), np.array([4, 2, 0]),
                              tmp_path / "g.png", resolution=np.array([20.0, 30.0, 999.0]), pixel_size=3.0)
    assert _is_png(path)


def test_ranked_gallery_counts_the_dropped_poor_fits(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr("matplotlib.figure.Figure.suptitle", lambda self, text, **kw: titles.append(text))
    averages = np.random.default_rng(1).normal(size=(3, 16, 16)).astype(np.float32)
    path = plot_ranked_gallery(averages, [50, 30, 20], [0.95, 0.2, 0.91], [True, False, True],
                               tmp_path / "rank.png", dropped=[5, 9, 2])
    assert _is_png(path)
    assert "(63 of 100 particles; -7 poor fits)" in titles[0]     # rejected class 2's 9 do not count
    with pytest.raises(ValueError, match="kept"):
        plot_ranked_gallery(averages, [50, 30, 20], [0.9, 0.2, 0.9], [True, False, True], tmp_path / "x.png",
                            dropped=[1, 2])
