"""Working images: streamed and in-RAM preparation agree; the effective CTF matches the prepared rows."""

from __future__ import annotations

import numpy as np
import torch

from cryo_drvae.ctf import params_from_particles
from cryo_drvae.fourier import alignment_mask
from cryo_drvae.preprocess import choose_working_box, plan_preparation, prepare_working_set
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import read_particles


def prepared(small_set, scratch=None, particles=None):
    table = read_particles(small_set.star_path)
    stack = ParticleStack.from_table(table, data_dir=small_set.star_path.parent)
    ctf = params_from_particles(table.per_particle(), str(table.path))
    plan = plan_preparation(stack, ctf, 4.0, 100.0, 32, seed=0)
    return prepare_working_set(stack, plan, particles, scratch)


def test_streamed_rows_equal_rows_in_ram(small_set, tmp_path):
    ram, disk = prepared(small_set), prepared(small_set, tmp_path / "scratch")
    assert disk.flipped.path is not None and ram.flipped.tensor is not None
    assert torch.equal(disk.weighted.read(0, len(disk)), ram.weighted.tensor)
    assert torch.equal(disk.flipped.take(np.array([5, 1, 200])), ram.flipped.tensor[[5, 1, 200]])
    assert ram.weighted.shape == (240, int(alignment_mask(32).sum()))
    subset = prepared(small_set, particles=np.array([3, 100, 7]))
    assert torch.equal(subset.flipped.tensor, ram.flipped.tensor[[3, 100, 7]])
    assert list(subset.particles) == [3, 100, 7]


def test_effective_ctf_links_flipped_and_weighted_images(small_set):
    ws = prepared(small_set)
    rows, others = np.array([0, 17, 99]), np.array([120, 200, 3])
    mask = torch.from_numpy(alignment_mask(32))
    weighted = ws.weighted.take(rows)

    def filtered_by(ctf_rows):
        spectrum = torch.fft.fft2(ws.flipped.take(rows)) * ws.effective_ctf(ctf_rows)
        return torch.fft.ifft2(spectrum).real[:, mask]

    # weighted = flipped filtered by |CTF x whitening| (up to the even box's Nyquist terms)
    right = (filtered_by(rows) - weighted).abs().max()
    wrong = (filtered_by(others) - weighted).abs().max()
    assert right < 0.02 * weighted.abs().max() and right < 0.1 * wrong


def test_working_box_keeps_a_small_particle_at_least_32_pixels_across():
    # 1HVR-like: 70 Å in a 64 px box at 1.7 Å/px; the 12 Å Nyquist alone gives 32 px (21 px across)
    box = choose_working_box(64, 1.7, particle_diameter=70.6)
    assert box == 48 and 70.6 / (64 * 1.7 / box) >= 30
    assert choose_working_box(64, 1.7) == 32                        # no diameter: the Nyquist rule
    assert choose_working_box(64, 3.0, particle_diameter=157.0) == 40
    assert choose_working_box(256, 1.0, particle_diameter=60.0) == 64   # capped at 64
    assert choose_working_box(40, 1.0, particle_diameter=10.0) == 40    # never above the box
    assert choose_working_box(64, 1.7, requested=56, particle_diameter=70.6) == 56
