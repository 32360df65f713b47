"""Tests for cryo_drvae.clustering: size bounds, balanced assignment, BSK-means++ estimator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score

from cryo_drvae.clustering import (
    BalancedKMeans,
    balanced_assignment,
    kmeans_plusplus_indices,
    kmeans_plusplus_init,
    reliable_mask,
    size_bounds,
)
from cryo_drvae.errors import ConfigError


def exact_bounded_cost(cost: np.ndarray, min_size: int, max_size: int) -> float:
    """Optimum by linear_sum_assignment on columns repeated max_size times per cluster.

    The first ``min_size`` copies of each cluster get a large bonus, so every optimum fills them.
    """
    n, k = cost.shape
    bonus = 1e6
    columns = [cost[:, j] - (bonus if r < min_size else 0.0) for j in range(k) for r in range(max_size)]
    owner = np.repeat(np.arange(k), max_size)
    rows, cols = linear_sum_assignment(np.stack(columns, axis=1))
    return float(cost[rows, owner[cols]].sum())


def blobs_with_sizes(sizes, centers, std, seed):
    X, y = make_blobs(n_samples=sizes, centers=np.asarray(centers, float), cluster_std=std, random_state=seed)
    return X, y


# ---------------------------------------------------------------------------------------------
# size_bounds / reliable_mask
# ---------------------------------------------------------------------------------------------
def test_size_bounds_values():
    assert size_bounds(100, 4, 0.2) == (5, 100)  # ceil(100 / 0.8) = 125 capped at n
    assert size_bounds(1000, 4, 0.8) == (200, 313)
    assert size_bounds(100, 4, 0.0) == (0, 100)
    assert size_bounds(100, 4, 1.0) == (25, 25)
    assert size_bounds(10, 3, 1.0) == (3, 4)


@pytest.mark.parametrize("balance", [-0.1, 1.5, float("nan")])
def test_size_bounds_rejects_bad_balance(balance):
    with pytest.raises(ConfigError, match="balance"):
        size_bounds(100, 4, balance)


def test_reliable_mask_picks_nearest_fraction_per_cluster():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    distances = np.array([4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 0.1, 7.0])
    mask = reliable_mask(distances, labels, 0.5)
    # cluster 0: ceil(0.5 * 4) = 2 nearest (1.0, 2.0); cluster 1: ceil(1.5) = 2 (0.1, 0.5); cluster 2: 1
    expected = np.array([False, True, False, True, True, False, True, True])
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(reliable_mask(distances, labels, 1.0), np.ones(8, bool))
    with pytest.raises(ConfigError, match="reliable_fraction"):
        reliable_mask(distances, labels, 0.0)


# ---------------------------------------------------------------------------------------------
# balanced_assignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_price_updates", [None, 0])  # 0: the exact repair does all the work
def test_balanced_assignment_equal_sizes_is_optimal(max_price_updates):
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = int(rng.integers(2, 6))
        n = k * int(rng.integers(2, 9))
        cost = rng.random((n, k)) ** 2
        labels = balanced_assignment(cost, n // k, n // k, max_price_updates=max_price_updates)
        np.testing.assert_array_equal(np.bincount(labels, minlength=k), np.full(k, n // k))
        got = cost[np.arange(n), labels].sum()
        assert got == pytest.approx(exact_bounded_cost(cost, n // k, n // k), abs=1e-9)


# A truncated price phase (1-5 updates) can leave a feasible but suboptimal start, which only the
# negative-cycle cancelling fixes; 0 starts from the plain argmin.
@pytest.mark.parametrize("max_price_updates", [None, 0, 1, 2, 3, 5])
def test_balanced_assignment_bounds_exact_and_optimal(max_price_updates):
    rng = np.random.default_rng(2)
    for trial in range(60):
        k = int(rng.integers(2, 6))
        n = int(rng.integers(k, 50))
        lo = int(rng.integers(0, n // k + 1))
        hi = int(rng.integers(max(lo, -(-n // k)), n + 1))
        cost = rng.random((n, k))
        if trial % 3 == 0:  # one popular cluster: the argmin breaks the bounds
            cost[:, 0] *= 0.2
        if trial % 5 == 0:  # duplicated samples: ties no price can separate
            cost[n // 2 :] = cost[: n - n // 2]
        labels = balanced_assignment(cost, lo, hi, max_price_updates=max_price_updates)
        counts = np.bincount(labels, minlength=k)
        assert counts.min() >= lo and counts.max() <= hi
        got = cost[np.arange(n), labels].sum()
        best = exact_bounded_cost(cost, lo, hi)
        # The spec allows 1% above the optimum; this solver is exact, so hold it to that.
        assert got == pytest.approx(best, abs=1e-9)


def test_balanced_assignment_unconstrained_is_argmin_and_rejects_infeasible():
    rng = np.random.default_rng(3)
    cost = rng.random((40, 5)).astype(np.float32)
    np.testing.assert_array_equal(balanced_assignment(cost, 0, 40), cost.argmin(axis=1))
    with pytest.raises(ValueError, match="infeasible"):
        balanced_assignment(cost, 9, 40)  # 5 * 9 > 40
    with pytest.raises(ValueError, match="infeasible"):
        balanced_assignment(cost, 0, 7)  # 5 * 7 < 40


# ---------------------------------------------------------------------------------------------
# BalancedKMeans
# ---------------------------------------------------------------------------------------------
def test_recovers_planted_blobs():
    centers = [[0, 0], [8, 0], [0, 8], [8, 8]]
    X, y = make_blobs(n_samples=600, centers=np.asarray(centers, float), cluster_std=1.0, random_state=0)
    km = BalancedKMeans(n_clusters=4, balance=0.2, random_state=0).fit(X)
    assert adjusted_rand_score(y, km.labels_) >= 0.95
    assert km.cluster_centers_.shape == (4, 2) and km.n_features_in_ == 2
    own = ((X - km.cluster_centers_[km.labels_]) ** 2).sum(axis=1)
    np.testing.assert_allclose(km.distances_, own, rtol=1e-4, atol=1e-4)
    assert km.inertia_ == pytest.approx(own.sum(), rel=1e-4)
    np.testing.assert_allclose(km.transform(X)[np.arange(600), km.labels_] ** 2, own, rtol=1e-3, atol=1e-3)


def test_keeps_planted_unequal_sizes_within_bounds():
    X, y = blobs_with_sizes([50, 500], [[0, 0], [12, 0]], 1.0, seed=1)
    km = BalancedKMeans(n_clusters=2, balance=0.05, random_state=0).fit(X)
    assert sorted(np.bincount(km.labels_)) == [50, 500]
    assert adjusted_rand_score(y, km.labels_) == 1.0


def test_high_balance_enforces_floor_and_cap():
    # One dense giant blob and three small far ones: plain K-means leaves the sizes ~ 900/33/33/34.
    X, _ = blobs_with_sizes([900, 33, 33, 34], [[0, 0], [30, 0], [0, 30], [30, 30]], 1.0, seed=2)
    plain = KMeans(n_clusters=4, n_init=1, random_state=0).fit(X)
    min_size, max_size = size_bounds(1000, 4, 0.8)
    assert np.bincount(plain.labels_).max() > max_size  # the constraint really binds here
    km = BalancedKMeans(n_clusters=4, balance=0.8, random_state=0).fit(X)
    sizes = np.bincount(km.labels_, minlength=4)
    assert sizes.min() >= min_size and sizes.max() <= max_size


def test_balance_zero_matches_plain_kmeans():
    X, y = make_blobs(n_samples=800, centers=5, cluster_std=1.5, random_state=4)
    km = BalancedKMeans(n_clusters=5, balance=0.0, n_init=3, random_state=0).fit(X)
    ref = KMeans(n_clusters=5, n_init=3, random_state=0).fit(X)
    assert adjusted_rand_score(ref.labels_, km.labels_) >= 0.98
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=0.01)


def test_same_seed_same_labels_and_predict_matches_unconstrained():
    X, _ = make_blobs(n_samples=500, centers=6, cluster_std=2.0, random_state=5)
    a = BalancedKMeans(n_clusters=6, balance=0.5, random_state=7).fit(X)
    b = BalancedKMeans(n_clusters=6, balance=0.5, random_state=7).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    free = BalancedKMeans(n_clusters=6, balance=0.0, random_state=7).fit(X)
    np.testing.assert_array_equal(free.predict(X), free.labels_)
    np.testing.assert_array_equal(free.fit_predict(X), free.labels_)


def test_reliable_attribute_is_nearest_half_of_each_class():
    X, _ = make_blobs(n_samples=300, centers=3, random_state=6)
    km = BalancedKMeans(n_clusters=3, balance=0.5, random_state=0, reliable_fraction=0.5).fit(X)
    for k in range(3):
        members = np.flatnonzero(km.labels_ == k)
        keep = members[km.reliable_[members]]
        assert keep.size == int(np.ceil(members.size / 2))
        assert km.distances_[keep].max() <= km.distances_[np.setdiff1d(members, keep)].min()


def test_convergence_warning_when_max_iter_hit():
    X, _ = make_blobs(n_samples=400, centers=5, cluster_std=3.0, random_state=8)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        BalancedKMeans(n_clusters=5, max_iter=1, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        BalancedKMeans(n_clusters=5, max_iter=300, random_state=0).fit(X)


def test_validation_in_fit():
    X = np.random.default_rng(0).normal(size=(3, 2))
    BalancedKMeans(n_clusters=4, balance=7.0)  # __init__ does not validate
    with pytest.raises(ValueError, match="need at least n_clusters=4 samples, got 3"):
        BalancedKMeans(n_clusters=4).fit(X)
    with pytest.raises(ConfigError, match="balance"):
        BalancedKMeans(n_clusters=2, balance=1.5).fit(X)
    with pytest.raises(ValueError):
        BalancedKMeans(n_clusters=2).fit(np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]))


# ---------------------------------------------------------------------------------------------
# K-means++ seeding
# ---------------------------------------------------------------------------------------------
def test_kmeans_plusplus_seeds_one_per_separated_blob():
    centers = np.array([[50.0 * i, 50.0 * (i % 2)] for i in range(8)])
    X, y = make_blobs(n_samples=800, centers=centers, cluster_std=0.5, random_state=9)
    seeds = kmeans_plusplus_init(X, 8, np.random.default_rng(0))
    owner = y[[int(np.flatnonzero((X == s).all(axis=1))[0]) for s in seeds]]
    assert sorted(owner) == list(range(8))  # uniform sampling would fail this with p > 0.99

    def sq_dist_rows(idx: np.ndarray) -> np.ndarray:  # any metric: here one sample at a time
        return np.stack([((X - X[i]) ** 2).sum(axis=1) for i in idx])

    idx = kmeans_plusplus_indices(sq_dist_rows, X.shape[0], 8, np.random.default_rng(0))
    assert sorted(y[idx]) == list(range(8))
    again = kmeans_plusplus_indices(sq_dist_rows, X.shape[0], 8, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)
