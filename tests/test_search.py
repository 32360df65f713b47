"""Coarse-to-fine class search: the band-limited first pass and the shortlisted exact E-step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryo_drvae import search
from cryo_drvae.config import ClusterConfig
from cryo_drvae.fourier import lowpass
from cryo_drvae.refine import Refiner, posterior

from test_discovery import needs_structures, protein_set, refiner_for, template_state


@pytest.fixture(scope="module")
def bright_set(tmp_path_factory):
    """The same protein at SNR 0.5: sharp pose peaks, band-versus-exact differences 10x larger."""
    return protein_set(tmp_path_factory.mktemp("kpr_bright"), "3KPR.cif.gz", snr=0.5)


@pytest.fixture(scope="module")
def kpr_set(tmp_path_factory):
    """3KPR, 6 views x 100 at SNR 0.05 with CTF, shifts and in-plane rotations."""
    return protein_set(tmp_path_factory.mktemp("kpr"), "3KPR.cif.gz")


def with_margin(ref: Refiner, margin: float) -> Refiner:
    return Refiner(ref.ws, ClusterConfig(n_classes=ref.cfg.n_classes, psi_step=ref.cfg.psi_step,
                                         search_margin=margin), ref.device)


@needs_structures
def test_band_pass_is_the_exact_likelihood_of_band_limited_references(kpr_set):
    # Parseval: a masked particle's inner product with a band-limited template is the sum over
    # the band's Fourier coefficients; a wrong phase sign, rotation or weight breaks it
    ref = refiner_for(kpr_set, search_margin=0.0)
    state = template_state(ref, kpr_set)
    coarse = search.CoarseSearch(ref, margin=10.0)
    band_refs = lowpass(state.refs, coarse.shell)
    prior = torch.from_numpy(state.log_prior).float()
    exact, exact_pose, _ = ref.expectation(band_refs, prior, soft_statistics=False)
    shortlist = coarse.shortlist(band_refs, prior)
    difference = np.abs(shortlist.coarse_ll.numpy() - exact)
    # left: the bilinear rotation's content above the band (a few nats at most); the class
    # log-likelihoods themselves spread over tens of nats
    assert np.median(difference) < 0.5 and difference.max() < 5.0, (np.median(difference), difference.max())
    assert np.ptp(exact, axis=1).mean() > 20.0
    assert np.mean(shortlist.coarse_ll.numpy().argmax(1) == exact.argmax(1)) >= 0.99
    rows, own = np.arange(len(exact)), exact.argmax(1)
    assert np.mean(shortlist.fine_pose.numpy()[rows, own] == exact_pose[rows, own]) > 0.9


@needs_structures
def test_shortlisted_e_step_matches_the_exhaustive_one_and_scores_fewer_classes(kpr_set):
    exhaustive = refiner_for(kpr_set, search_margin=0.0)
    state = template_state(exhaustive, kpr_set)
    shares = np.array([0.3, 0.25, 0.15, 0.12, 0.1, 0.08])         # unequal priors: the margin is on posteriors
    state.log_prior = np.log(shares / shares.sum())
    prior = torch.from_numpy(state.log_prior).float()
    ll, pose, stats = exhaustive.expectation(state.refs, prior)
    shortlisted = with_margin(exhaustive, 10.0)
    short = shortlisted.shortlist(state.refs, prior)
    assert short.mean_classes < 0.6 * state.refs.shape[0]          # it saves work at SNR 0.05
    ll2, pose2, stats2 = shortlisted.expectation(state.refs, prior)
    labels, labels2 = posterior(ll, state.log_prior).argmax(1), posterior(ll2, state.log_prior).argmax(1)
    rows = np.arange(len(labels))
    assert np.mean(labels == labels2) >= 0.995
    assert np.mean(pose[rows, labels] == pose2[rows, labels]) >= 0.995
    relative = (stats.frame_sums - stats2.frame_sums).norm() / stats.frame_sums.norm()
    assert relative < 0.01, float(relative)
    # the classes left out are estimated at least the margin below the particle's best
    joint2 = ll2 + state.log_prior[None]
    left_out = ~shortlisted.last_shortlist.chosen.numpy()          # as the E-step widened it
    gap = joint2.max(1, keepdims=True) - joint2
    assert left_out.any() and gap[left_out].min() >= 10.0 - 1e-3


@needs_structures
def test_an_unbounded_margin_is_the_exhaustive_e_step(kpr_set):
    exhaustive = refiner_for(kpr_set, search_margin=0.0)
    state = template_state(exhaustive, kpr_set)
    prior = torch.from_numpy(state.log_prior).float()
    ll, pose, stats = exhaustive.expectation(state.refs, prior)
    ll2, pose2, stats2 = with_margin(exhaustive, 1e9).expectation(state.refs, prior)
    assert np.abs(ll - ll2).max() < 1e-2
    assert np.array_equal(pose, pose2)
    assert torch.allclose(stats.frame_sums, stats2.frame_sums, rtol=1e-3, atol=1e-4)
    assert torch.allclose(stats.ctf2_sums, stats2.ctf2_sums, rtol=1e-4)


@needs_structures
def test_few_references_are_scored_exhaustively(kpr_set):
    # partial E-steps of split-and-merge moves hold 1-3 classes: no coarse pass for them
    ref = refiner_for(kpr_set, search_margin=10.0)
    state = template_state(with_margin(ref, 0.0), kpr_set)
    few = search.MIN_SHORTLISTED_CLASSES - 1
    ref.expectation(state.refs[:few], torch.from_numpy(state.log_prior[:few]).float())
    assert ref._search is None
    ref.expectation(state.refs, torch.from_numpy(state.log_prior).float())
    assert ref._search is not None


def test_rotation_masks_pack_and_unpack():
    keep = torch.rand(5, 3, 37, generator=torch.Generator().manual_seed(2)) < 0.3
    packed = search.pack_rotations(keep)
    assert packed.shape == (5, 3, 5) and packed.dtype == torch.uint8
    assert torch.equal(search.unpack_rotations(packed, 37), keep)


@needs_structures
@pytest.mark.parametrize("which", ["kpr_set", "bright_set"])
def test_exact_pass_scores_the_rotations_the_band_pass_keeps(request, which):
    # the band pass's best pose per rotation decides which rotations the exact pass scores: the
    # exhaustive best pose's rotation is kept, and the rotations left out hold no posterior mass
    kpr_set = request.getfixturevalue(which)
    exhaustive = refiner_for(kpr_set, search_margin=0.0, psi_step=10.0)
    state = template_state(exhaustive, kpr_set)
    prior = torch.from_numpy(state.log_prior).float()
    ll, pose, _ = exhaustive.expectation(state.refs, prior)
    ref = with_margin(exhaustive, 10.0)
    short = ref.shortlist(state.refs, prior)
    n_psi = len(ref.grid.psi_deg)
    kept = search.unpack_rotations(short.rotations, n_psi)                  # (n, K, R)
    assert kept[short.chosen].float().mean() < 0.5                          # it saves work
    ll2, pose2, _ = ref.expectation(state.refs, prior)
    rows, own = np.arange(len(ll)), ll.argmax(1)
    best_rotation = torch.from_numpy(pose[rows, own] // len(ref.grid.shifts))
    assert kept[rows, own, best_rotation].float().mean() >= 0.995
    chosen = short.chosen.numpy()
    assert np.abs(ll - ll2)[chosen].max() < 0.5 and np.median(np.abs(ll - ll2)[chosen]) < 1e-3
