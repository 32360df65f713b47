"""Balance-size K-means++ (BSK-means++): the package's one K-means++ seeding and Lloyd loop.

Lloyd iterations whose assignment step keeps every cluster size between bounds set by one
``balance`` parameter (Yan et al., IEEE TMI 2023), from K-means++ seeds: :func:`bsk_means`, in any
:class:`Metric`. :class:`BalancedKMeans` is the scikit-learn estimator in the Euclidean metric (DRVAE
latents); ``refine.Refiner.cluster_denoised`` runs the same loop on images aligned over poses.

Example
-------
>>> from cryo_drvae.clustering import BalancedKMeans
>>> km = BalancedKMeans(n_clusters=50, balance=0.2, random_state=0).fit(latents)  # doctest: +SKIP
>>> labels, reliable = km.labels_, km.reliable_                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import sparse
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import _check_sample_weight, check_array, check_is_fitted

from cryo_drvae.errors import ConfigError

__all__ = [
    "BSKRun",
    "BalancedKMeans",
    "EuclideanMetric",
    "Metric",
    "balanced_assignment",
    "bsk_means",
    "kmeans_plusplus_indices",
    "kmeans_plusplus_init",
    "reliable_mask",
    "size_bounds",
]

logger = logging.getLogger(__name__)

#: Rows per block when computing sample-to-centre distances (bounds the temporary memory).
CHUNK_ROWS = 65536
#: balanced_assignment warm-starts its prices on subsamples down to about this many rows.
_COARSEST_ROWS = 16384


# ---------------------------------------------------------------------------------------------
# Size bounds and the reliable-particle mask
# ---------------------------------------------------------------------------------------------
def size_bounds(n_samples: int, n_clusters: int, balance: float) -> tuple[int, int]:
    """Smallest and largest allowed cluster size for a balance parameter.

    ``min_size = floor(balance * n / K)`` and ``max_size = ceil(n / (K * balance))``, capped at
    ``n``. ``balance = 0`` gives ``(0, n)`` (no constraint); ``balance = 1`` gives sizes as equal
    as the integers allow (``floor(n / K)`` to ``ceil(n / K)``). The bounds are always feasible:
    ``K * min_size <= n <= K * max_size``.

    Parameters
    ----------
    n_samples : int
        Number of samples ``n``.
    n_clusters : int
        Number of clusters ``K`` (>= 1).
    balance : float
        Balance parameter in ``[0, 1]``.

    Returns
    -------
    min_size, max_size : tuple of int

    Raises
    ------
    ConfigError
        If ``balance`` is outside ``[0, 1]`` or ``n_clusters < 1``.
    """
    if not (0.0 <= balance <= 1.0):  # also rejects NaN
        raise ConfigError(f"cluster balance must be in [0, 1], got {balance}")
    if n_clusters < 1:
        raise ConfigError(f"n_clusters must be >= 1, got {n_clusters}")
    if balance == 0.0:
        return 0, int(n_samples)
    # The 1e-9 slack keeps float round-off (0.2 * 100 / 4 = 5.000000000000001) from moving a
    # bound by one; exact integer ratios differ from their neighbours by >= 1 / K >> 1e-9.
    min_size = math.floor(balance * n_samples / n_clusters + 1e-9)
    max_size = math.ceil(n_samples / (n_clusters * balance) - 1e-9)
    return int(min_size), int(min(max_size, n_samples))


def reliable_mask(
    distances: ArrayLike, labels: ArrayLike, fraction: float
) -> NDArray[np.bool_]:
    """Mark, per cluster, the ``fraction`` of members closest to their centre.

    These are the paper's "reliable" particles. A non-empty cluster of size ``m`` keeps
    ``ceil(fraction * m)`` members (at least 1); ties are broken by sample index.

    Parameters
    ----------
    distances : array-like of shape (n_samples,)
        Distance (any monotone measure, e.g. squared) of each sample to its own centre.
    labels : array-like of shape (n_samples,)
        Non-negative integer cluster label of each sample.
    fraction : float
        Fraction in ``(0, 1]`` of each cluster to keep.

    Returns
    -------
    mask : ndarray of shape (n_samples,), bool

    Raises
    ------
    ConfigError
        If ``fraction`` is not in ``(0, 1]``.
    ValueError
        If ``distances`` and ``labels`` differ in length.
    """
    if not (0.0 < fraction <= 1.0):
        raise ConfigError(f"reliable_fraction must be in (0, 1], got {fraction}")
    distances = np.asarray(distances, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if distances.shape != labels.shape:
        raise ValueError(
            f"distances and labels must have the same length, got {distances.size} and {labels.size}"
        )
    mask = np.zeros(labels.size, dtype=bool)
    if labels.size == 0:
        return mask
    # Sort by (label, distance, index): each cluster becomes one contiguous, ordered run.
    order = np.lexsort((np.arange(labels.size), distances, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, labels.size])
    keep = np.maximum(1, np.ceil(fraction * sizes - 1e-9).astype(np.intp))
    rank = np.arange(labels.size) - np.repeat(starts, sizes)
    mask[order] = rank < np.repeat(keep, sizes)
    return mask


# ---------------------------------------------------------------------------------------------
# Balanced assignment
# ---------------------------------------------------------------------------------------------
def balanced_assignment(
    cost: ArrayLike,
    min_size: int,
    max_size: int,
    *,
    max_price_updates: int | None = None,
) -> NDArray[np.intp]:
    """Assign samples to clusters at minimum total cost with size bounds.

    Solves ``min sum_i cost[i, labels[i]]`` subject to
    ``min_size <= |{i : labels[i] = k}| <= max_size`` for every cluster ``k``. This is a
    transportation problem (a min-cost flow), so it has an integral optimum; this function
    returns an optimal one (up to float round-off) in two phases:

    1. **Dual prices (fast, bulk).** Keep one price ``p_k`` per cluster and assign each sample to
       ``argmin_k cost[i, k] + p_k``. Clusters that break a bound or complementary slackness
       (``p_k > 0`` but not full, ``p_k < 0`` but above the floor) get, one at a time
       (Gauss-Seidel), the exact price that makes them hold exactly ``max_size`` (or
       ``min_size``, or leaves them free at ``p_k = 0``) given the other prices. Each such update
       is exact coordinate ascent on the concave Lagrangian dual and costs O(n) thanks to cached
       best / second-best clusters per sample. When no cluster is left to update, primal
       feasibility + complementary slackness certify optimality.
    2. **Exact repair.** Price ascent can stall on ties (duplicate samples) or be cut off by
       ``max_price_updates``. The remainder is fixed on the (K + 1)-node residual graph whose arc
       ``a -> b`` costs ``min_{i in a} cost[i, b] - cost[i, a]`` (moving the cheapest sample):
       successive shortest paths (Bellman-Ford) move samples until all bounds hold, then
       negative cycles (through a node that lets sizes shift inside the bounds) are cancelled
       until none is left, which is the optimality condition of min-cost flow.

    Why this design: a generic min-cost-flow or Hungarian solver on the n x K bipartite graph
    is far too slow in Python for n = 1e6, and regret-greedy moves are not optimal. Prices move
    many samples per O(n) step, and the small cluster graph makes the exact finish cheap.
    The result is deterministic (no randomness; ties go to the lower cluster index).

    Parameters
    ----------
    cost : array-like of shape (n_samples, n_clusters)
        Assignment costs, e.g. squared distances. float32 is kept as float32 (no copy).
    min_size, max_size : int
        Size bounds; must satisfy ``n_clusters * min_size <= n_samples <= n_clusters * max_size``.
    max_price_updates : int, optional
        Cap on phase-1 price updates at full size (default ``20 * n_clusters``); 0 skips
        straight to the exact repair. Only affects speed, never the bounds or optimality.

    Returns
    -------
    labels : ndarray of shape (n_samples,), intp

    Raises
    ------
    ValueError
        If ``cost`` is not a finite 2D array or the bounds cannot be met.
    """
    cost = np.asarray(cost)
    if cost.dtype not in (np.float32, np.float64):
        cost = cost.astype(np.float64)
    if cost.ndim != 2 or cost.shape[1] < 1:
        raise ValueError(f"cost must be a 2D array (n_samples, n_clusters), got shape {cost.shape}")
    n, k = cost.shape
    lo, hi = max(int(min_size), 0), min(int(max_size), n)
    if k * lo > n or k * hi < n or lo > hi:
        raise ValueError(
            f"size bounds [{min_size}, {max_size}] are infeasible for {n} samples in {k} clusters; "
            "need n_clusters * min_size <= n_samples <= n_clusters * max_size"
        )
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    if not np.isfinite(cost).all():
        raise ValueError("cost contains NaN or infinite values")
    if k == 1:
        return np.zeros(n, dtype=np.intp)

    # Warm-start the prices on nested strided subsamples (coarse to fine, each 8x larger): a
    # subsample's prices are nearly right for the full set, so the expensive full-size level
    # only needs a few corrections. Strided rows give a deterministic, proportional sample.
    levels = [n]
    while levels[-1] > 8 * _COARSEST_ROWS:
        levels.append(levels[-1] // 8)
    prices = np.zeros(k, dtype=np.float64)
    for m in levels[:0:-1]:
        rows = np.arange(0, n, n // m)
        scale = rows.size / n
        prices, _, _ = _price_phase(
            cost[rows], math.floor(lo * scale), math.ceil(hi * scale), 200 * k, prices
        )
    cap = 20 * k if max_price_updates is None else max_price_updates
    prices, best, counts = _price_phase(cost, lo, hi, cap, prices)
    labels = best
    if np.any(counts < lo) or np.any(counts > hi) or _slack_violations(prices, counts, lo, hi).any():
        labels = _ExactRepair(cost, labels, lo, hi).run()
    return labels


def _top2(
    cost: NDArray, prices: NDArray[np.float64], rows: NDArray[np.intp] | None = None
) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.intp], NDArray[np.float64]]:
    """Best and second-best cluster (and their priced costs) for ``rows`` (all if None)."""
    m = cost.shape[0] if rows is None else rows.size
    b1 = np.empty(m, dtype=np.intp)
    b2 = np.empty(m, dtype=np.intp)
    v1 = np.empty(m, dtype=np.float64)
    v2 = np.empty(m, dtype=np.float64)
    for start in range(0, m, CHUNK_ROWS):
        sl = slice(start, min(m, start + CHUNK_ROWS))
        sub = (cost[sl] if rows is None else cost[rows[sl]]) + prices  # float64 copy
        ar = np.arange(sub.shape[0])
        j1 = sub.argmin(axis=1)
        b1[sl], v1[sl] = j1, sub[ar, j1]
        sub[ar, j1] = np.inf
        j2 = sub.argmin(axis=1)
        b2[sl], v2[sl] = j2, sub[ar, j2]
    return b1, v1, b2, v2


def _slack_violations(
    prices: NDArray[np.float64], counts: NDArray[np.intp], lo: int, hi: int
) -> NDArray[np.bool_]:
    """Clusters breaking a bound or complementary slackness at the current prices."""
    return (counts > hi) | (counts < lo) | ((prices > 0) & (counts < hi)) | ((prices < 0) & (counts > lo))


def _coordinate_price(t: NDArray[np.float64], lo: int, hi: int) -> float:
    """Exact 1D dual optimum for one cluster: sample i joins it iff ``price < t[i]``."""
    n = t.size
    if hi < n and np.count_nonzero(t > 0) > hi:
        # Between the hi-th and (hi+1)-th largest threshold: exactly hi samples stay.
        part = np.partition(t, [n - hi - 1, n - hi])
        return 0.5 * (float(part[n - hi - 1]) + float(part[n - hi]))
    if lo > 0 and np.count_nonzero(t >= 0) < lo:
        part = np.partition(t, [n - lo - 1, n - lo])
        return 0.5 * (float(part[n - lo - 1]) + float(part[n - lo]))
    return 0.0


def _price_phase(
    cost: NDArray, lo: int, hi: int, max_updates: int, prices: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.intp], NDArray[np.intp]]:
    """Gauss-Seidel coordinate ascent on the cluster prices (phase 1 of balanced_assignment)."""
    n, k = cost.shape
    prices = prices.copy()
    b1, v1, b2, v2 = _top2(cost, prices)
    counts = np.bincount(b1, minlength=k)
    j = -1
    stalled = 0
    n_updates = 0
    for n_updates in range(max_updates + 1):
        todo = np.flatnonzero(_slack_violations(prices, counts, lo, hi))
        if todo.size == 0 or stalled >= todo.size or n_updates == max_updates:
            break
        # Round-robin over the clusters that still need a price change.
        nxt = todo[todo > j]
        j = int(nxt[0] if nxt.size else todo[0])
        thresholds = np.where(b1 == j, v2, v1) - cost[:, j]
        new = _coordinate_price(thresholds, lo, hi)
        old = prices[j]
        if new == old:  # ties (duplicate samples): price cannot fix this cluster
            stalled += 1
            continue
        stalled = 0
        prices[j] = new
        affected = (b1 == j) | (b2 == j)
        if new < old:
            affected |= cost[:, j] + new < v2
        rows = np.flatnonzero(affected)
        counts -= np.bincount(b1[rows], minlength=k)
        b1[rows], v1[rows], b2[rows], v2[rows] = _top2(cost, prices, rows)
        counts += np.bincount(b1[rows], minlength=k)
    logger.debug("balanced_assignment: %d price updates, max |price| %.3g", n_updates, np.abs(prices).max())
    return prices, b1, counts


class _ExactRepair:
    """Phase 2 of balanced_assignment: shortest paths, then negative-cycle cancelling.

    Nodes ``0..K-1`` are clusters, node ``K`` is a "size" node: ``K -> a`` exists when cluster
    ``a`` may shrink (size > min) and ``b -> K`` when ``b`` may grow (size < max), both free.
    Arc ``a -> b`` moves the sample of ``a`` with the smallest ``cost[i, b] - cost[i, a]``.
    A simple cycle uses each source cluster once, so its moves touch distinct samples.
    """

    def __init__(self, cost: NDArray, labels: NDArray[np.intp], lo: int, hi: int) -> None:
        self.cost, self.labels, self.lo, self.hi = cost, labels.copy(), lo, hi
        n, k = cost.shape
        self.k = k
        self.counts = np.bincount(self.labels, minlength=k)
        # Costs are differenced in float64 (exact for float32 input), so only round-off in sums
        # of <= K + 1 arcs remains; anything above this is a real improvement.
        self.tol = 1e-12 * (k + 1) * max(1.0, float(np.abs(cost).max()))
        self.arc = np.full((k, k), np.inf)
        self.mover = np.zeros((k, k), dtype=np.intp)
        order = np.argsort(self.labels, kind="stable")
        starts = np.r_[0, np.cumsum(self.counts)]
        for a in range(k):
            self._update_row(a, order[starts[a] : starts[a + 1]])
        self.n_moves = 0

    def _update_row(self, a: int, members: NDArray[np.intp] | None = None) -> None:
        if members is None:
            members = np.flatnonzero(self.labels == a)
        self.arc[a] = np.inf
        if members.size == 0:
            return
        best = np.full(self.k, np.inf)
        who = np.zeros(self.k, dtype=np.intp)
        for start in range(0, members.size, CHUNK_ROWS):
            idx = members[start : start + CHUNK_ROWS]
            sub = self.cost[idx].astype(np.float64)
            sub -= sub[:, a : a + 1]
            am = sub.argmin(axis=0)
            val = sub[am, np.arange(self.k)]
            better = val < best
            best[better], who[better] = val[better], idx[am[better]]
        best[a] = np.inf
        self.arc[a], self.mover[a] = best, who

    def _move_along(self, nodes: list[int]) -> None:
        """Move one sample along each cluster arc of ``nodes`` (a path or a closed cycle)."""
        moves = [(u, v) for u, v in zip(nodes[:-1], nodes[1:]) if u < self.k and v < self.k]
        picked = [int(self.mover[u, v]) for u, v in moves]
        for (u, v), i in zip(moves, picked):
            self.labels[i] = v
            self.counts[u] -= 1
            self.counts[v] += 1
        for a in {u for u, _ in moves} | {v for _, v in moves}:
            self._update_row(a)
        self.n_moves += len(moves)

    def _bellman_ford(
        self, graph: NDArray[np.float64], dist: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.intp], int]:
        """Relax ``len(dist)`` rounds; returns distances, predecessors, last node improved (-1 if settled)."""
        m = dist.size
        pred = np.full(m, -1, dtype=np.intp)
        last = -1
        for _ in range(m):
            cand = dist[:, None] + graph
            src = cand.argmin(axis=0)
            new = cand[src, np.arange(m)]
            better = new < dist - self.tol
            if not better.any():
                return dist, pred, -1
            dist = np.where(better, new, dist)
            pred[better] = src[better]
            last = int(np.flatnonzero(better)[0])
        return dist, pred, last

    def _path(self, sources: NDArray[np.bool_], targets: NDArray[np.bool_]) -> list[int]:
        dist, pred, _ = self._bellman_ford(self.arc, np.where(sources, 0.0, np.inf))
        end = int(np.argmin(np.where(targets, dist, np.inf)))
        path = [end]
        while pred[path[-1]] >= 0 and not sources[path[-1]] and len(path) <= self.k:
            path.append(int(pred[path[-1]]))
        return path[::-1]

    def run(self) -> NDArray[np.intp]:
        lo, hi, k = self.lo, self.hi, self.k
        # Feasibility: every path keeps intermediate sizes and only shrinks (grows) its start (end).
        while True:
            over, under = self.counts > hi, self.counts < lo
            if over.any():
                src = np.zeros(k, dtype=bool)
                src[np.flatnonzero(over)[0]] = True
                path = self._path(src, self.counts < hi)
            elif under.any():
                dst = np.zeros(k, dtype=bool)
                dst[np.flatnonzero(under)[0]] = True
                path = self._path(self.counts > lo, dst)
            else:
                break
            self._move_along(path)
        feasible_moves = self.n_moves
        # Optimality: cancel negative cycles until the residual graph has none.
        graph = np.full((k + 1, k + 1), np.inf)
        while True:
            graph[:k, :k] = self.arc
            graph[k, :k] = np.where(self.counts > lo, 0.0, np.inf)
            graph[:k, k] = np.where(self.counts < hi, 0.0, np.inf)
            _, pred, last = self._bellman_ford(graph, np.zeros(k + 1))
            if last < 0:
                break
            node = last
            for _ in range(k + 1):  # walk back into the cycle
                node = int(pred[node])
            cycle = [node]
            while True:
                prev = int(pred[cycle[-1]])
                if prev == node or len(cycle) > k + 1:
                    break
                cycle.append(prev)
            cycle = [node] + cycle[::-1]  # forward order, closed: node -> ... -> node
            gain = sum(graph[u, v] for u, v in zip(cycle[:-1], cycle[1:]))
            if not gain < -self.tol:
                break
            self._move_along(cycle)
        logger.debug(
            "balanced_assignment repair: %d moves for feasibility, %d for optimality",
            feasible_moves,
            self.n_moves - feasible_moves,
        )
        return self.labels


# ---------------------------------------------------------------------------------------------
# K-means++ seeding
# ---------------------------------------------------------------------------------------------
def kmeans_plusplus_indices(
    sq_dist_rows: Callable[[NDArray[np.intp]], ArrayLike],
    n_samples: int,
    n_clusters: int,
    rng: np.random.Generator,
    *,
    sample_weight: ArrayLike | None = None,
    n_local_trials: int | None = None,
) -> NDArray[np.intp]:
    """Greedy K-means++ (D^2 sampling, best of several candidates per step, as in sklearn): the one
    seeding of the package; returns the indices of the seeds.

    ``sq_dist_rows(idx)`` gives the squared distances ``(len(idx), n_samples)`` from the samples
    ``idx`` to every sample, in any metric (negative round-off counts as 0).
    ``n_local_trials`` defaults to ``2 + log(n_clusters)``.
    """
    if n_clusters > n_samples:
        raise ValueError(f"need at least n_clusters={n_clusters} samples, got {n_samples}")
    w = np.ones(n_samples) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))

    def rows(idx: NDArray[np.intp]) -> NDArray[np.float64]:
        return np.maximum(np.asarray(sq_dist_rows(idx), dtype=np.float64), 0.0)

    centres = np.empty(n_clusters, dtype=np.intp)
    centres[0] = rng.choice(n_samples, p=w / w.sum())
    closest = rows(centres[:1])[0]
    pot = float(np.dot(w, closest))
    for c in range(1, n_clusters):
        if pot > 0:
            cum = np.cumsum(w * closest)
            cand = np.searchsorted(cum, rng.random(n_local_trials) * cum[-1], side="right")
            cand = np.minimum(cand, n_samples - 1)
        else:  # every sample sits on a centre: any point is as good as another
            cand = rng.choice(n_samples, size=n_local_trials)
        d = np.minimum(closest, rows(cand))
        pots = d @ w
        best = int(np.argmin(pots))
        centres[c], closest, pot = cand[best], d[best], float(pots[best])
    return centres


def kmeans_plusplus_init(X: ArrayLike, n_clusters: int, rng: np.random.Generator, **options: Any) -> NDArray:
    """K-means++ initial centres of ``X`` (rows of it): :func:`kmeans_plusplus_indices` in the
    Euclidean metric; ``options`` are its ``sample_weight`` and ``n_local_trials``."""
    X = check_array(X, dtype=[np.float64, np.float32])
    if options.get("sample_weight") is not None:
        options["sample_weight"] = _check_sample_weight(options["sample_weight"], X)
    idx = kmeans_plusplus_indices(_seed_rows(EuclideanMetric(X)), X.shape[0], n_clusters, rng, **options)
    return X[idx].copy()


def _seed_rows(metric: Metric) -> Callable[[NDArray[np.intp]], NDArray]:
    """K-means++'s ``sq_dist_rows`` in ``metric``: the samples ``idx`` taken as centres."""
    return lambda idx: metric.distances(metric.centres_at(idx))[0].T


# ---------------------------------------------------------------------------------------------
# The metric and the Lloyd loop
# ---------------------------------------------------------------------------------------------
class Metric(Protocol):
    """The distance BSK-means++ runs in: :class:`EuclideanMetric`, or minimised over in-plane poses
    (``refine.AlignedMetric``). Centres may be of any array type."""

    n_samples: int

    def centres_at(self, idx: NDArray[np.intp]) -> Any:
        """The samples ``idx`` as centres (the K-means++ seeds)."""

    def distances(self, centres: Any) -> tuple[NDArray, Any]:
        """Squared distances ``(n_samples, K)`` to ``centres``, and side information per pair
        (e.g. the best pose) or None."""

    def means(self, labels: NDArray[np.intp], dist: NDArray, side: Any, old: Any) -> Any:
        """New centres from the labels and the ``distances`` result that gave them."""


class EuclideanMetric:
    """Squared Euclidean distances (float32) to the rows of ``X``; centres are the weighted float64
    means, an empty class moves to the worst-fitted samples."""

    def __init__(self, X: NDArray, sample_weight: NDArray[np.float64] | None = None) -> None:
        self.X, self.n_samples = X, X.shape[0]
        self.weights = np.ones(self.n_samples) if sample_weight is None else sample_weight
        self.sq_norms = _row_sq_norms(X)

    def centres_at(self, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        return self.X[idx].astype(np.float64)

    def distances(self, centres: NDArray) -> tuple[NDArray[np.float32], None]:
        return _sq_distances(self.X, centres, self.sq_norms), None

    def means(
        self, labels: NDArray[np.intp], dist: NDArray[np.float32], side: None, old: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        X, weights, k = self.X, self.weights, old.shape[0]
        sums = np.zeros((k, X.shape[1]))
        for start in range(0, X.shape[0], CHUNK_ROWS):
            sl = slice(start, start + CHUNK_ROWS)
            lab = labels[sl]
            onehot = sparse.csr_matrix((weights[sl], (lab, np.arange(lab.size))), shape=(k, lab.size))
            sums += onehot @ X[sl].astype(np.float64)
        mass = np.bincount(labels, weights=weights, minlength=k)
        centres = old.copy()
        full = mass > 0
        centres[full] = sums[full] / mass[full, None]
        empty = np.flatnonzero(~full)
        if empty.size:  # only possible when min_size == 0
            own = dist[np.arange(labels.size), labels]
            far = np.argsort(-own, kind="stable")[: empty.size]
            centres[empty] = X[far]
            logger.debug("BSK-means++: %d empty clusters moved to far samples", empty.size)
        return centres


@dataclass
class BSKRun:
    """One BSK-means++ run: centres, balanced labels, and the distances (n, K) and side
    information to those centres that gave the labels."""

    centres: Any
    labels: NDArray[np.intp]
    distances: NDArray
    side: Any
    n_iter: int
    converged: bool

    @property
    def own(self) -> NDArray:
        """Distance of each sample to its own centre."""
        return self.distances[np.arange(self.labels.size), self.labels]


def bsk_means(
    metric: Metric,
    n_clusters: int,
    min_size: int,
    max_size: int,
    rng: np.random.Generator,
    *,
    max_iter: int,
    tol: float | None = None,
    sample_weight: NDArray[np.float64] | None = None,
) -> BSKRun:
    """One BSK-means++ run in ``metric``, the package's one Lloyd loop: K-means++ seeds, then
    assignments by :func:`balanced_assignment` within ``[min_size, max_size]`` and centre updates.

    Stops when the labels repeat, when the summed squared centre shift is <= ``tol`` (None: not
    tested), or after ``max_iter`` centre updates; the labels always belong to the final centres.
    """
    seeds = kmeans_plusplus_indices(_seed_rows(metric), metric.n_samples, n_clusters, rng,
                                    sample_weight=sample_weight)
    centres = metric.centres_at(seeds)
    labels = None
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        dist, side = metric.distances(centres)
        new_labels = balanced_assignment(dist, min_size, max_size)
        if labels is not None and np.array_equal(new_labels, labels):
            converged = True
            break
        labels = new_labels
        new_centres = metric.means(labels, dist, side, centres)
        shift = None if tol is None else float(((new_centres - centres) ** 2).sum())
        centres = new_centres
        if shift is not None and shift <= tol:
            converged = True
            dist, side = metric.distances(centres)
            labels = balanced_assignment(dist, min_size, max_size)
            break
    else:  # max_iter reached: labels must match the final centres
        dist, side = metric.distances(centres)
        labels = balanced_assignment(dist, min_size, max_size)
    return BSKRun(centres, labels, dist, side, n_iter, converged)


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------
def _row_sq_norms(X: NDArray) -> NDArray[np.float32]:
    out = np.empty(X.shape[0], dtype=np.float32)
    for start in range(0, X.shape[0], CHUNK_ROWS):
        xc = X[start : start + CHUNK_ROWS].astype(np.float32, copy=False)
        out[start : start + CHUNK_ROWS] = np.einsum("ij,ij->i", xc, xc)
    return out


def _sq_distances(X: NDArray, centres: NDArray, x_sq_norms: NDArray[np.float32]) -> NDArray[np.float32]:
    """Squared distances (n_samples, n_centres) in float32, ``|x|^2 - 2 x.c + |c|^2`` by blocks."""
    c = np.asarray(centres, dtype=np.float32)
    c_sq = np.einsum("ij,ij->i", c, c)
    out = np.empty((X.shape[0], c.shape[0]), dtype=np.float32)
    for start in range(0, X.shape[0], CHUNK_ROWS):
        sl = slice(start, start + CHUNK_ROWS)
        block = out[sl]
        np.matmul(X[sl].astype(np.float32, copy=False), c.T, out=block)
        block *= -2.0
        block += x_sq_norms[sl, None]
        block += c_sq[None, :]
        np.maximum(block, 0.0, out=block)  # round-off can go slightly negative
    return out


# ---------------------------------------------------------------------------------------------
# Estimator
# ---------------------------------------------------------------------------------------------
class BalancedKMeans(ClusterMixin, BaseEstimator):
    """K-means++ whose cluster sizes stay between bounds set by a balance parameter (BSK-means++).

    :func:`bsk_means` in the :class:`EuclideanMetric`: every Lloyd iteration assigns samples by
    :func:`balanced_assignment` on squared Euclidean distances, so each cluster holds between
    ``floor(balance * n / K)`` and ``ceil(n / (K * balance))`` samples (see :func:`size_bounds`);
    centres are the (weighted) means. ``balance = 0`` is plain K-means++ / Lloyd.

    Parameters
    ----------
    n_clusters : int, default=50
        Number of classes ``K``.
    balance : float, default=0.2
        In ``[0, 1]``; 0 = no size constraint, 1 = equal sizes.
    max_iter : int, default=100
        Maximum Lloyd iterations per initialisation.
    tol : float, default=1e-4
        Convergence tolerance on the summed squared centre shift, relative to the mean
        per-feature variance of ``X`` (the scikit-learn convention). Iterations also stop as
        soon as the labels stop changing.
    n_init : int, default=1
        Number of K-means++ restarts; the lowest-inertia run is kept.
    random_state : int or None, default=None
        Seed for ``np.random.default_rng``.
    reliable_fraction : float, default=0.5
        Fraction in ``(0, 1]`` of each class, nearest its centre, marked in ``reliable_``.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    labels_ : ndarray of shape (n_samples,)
    inertia_ : float
        Sum of (weighted) squared distances of samples to their own centre.
    n_iter_ : int
        Lloyd iterations of the kept run.
    distances_ : ndarray of shape (n_samples,)
        Squared distance of each sample to its own centre.
    reliable_ : ndarray of shape (n_samples,), bool
        The ``reliable_fraction`` of each class closest to its centre (:func:`reliable_mask`).
    n_features_in_ : int
    """

    def __init__(
        self,
        n_clusters: int = 50,
        balance: float = 0.2,
        max_iter: int = 100,
        tol: float = 1e-4,
        n_init: int = 1,
        random_state: int | None = None,
        reliable_fraction: float = 0.5,
    ) -> None:
        self.n_clusters = n_clusters  # store only; all checks happen in fit
        self.balance = balance
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.random_state = random_state
        self.reliable_fraction = reliable_fraction

    def _check_params(self, n_samples: int) -> tuple[int, int]:
        for name in ("n_clusters", "max_iter", "n_init"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"BalancedKMeans.{name} must be an integer >= 1, got {value!r}")
        if not (0.0 < self.reliable_fraction <= 1.0):
            raise ConfigError(
                f"BalancedKMeans.reliable_fraction must be in (0, 1], got {self.reliable_fraction}"
            )
        if not self.tol >= 0:
            raise ConfigError(f"BalancedKMeans.tol must be >= 0, got {self.tol}")
        if n_samples < self.n_clusters:
            raise ValueError(f"need at least n_clusters={self.n_clusters} samples, got {n_samples}")
        return size_bounds(n_samples, self.n_clusters, self.balance)

    def fit(self, X: ArrayLike, y: None = None, sample_weight: ArrayLike | None = None) -> BalancedKMeans:
        """Cluster ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Finite features, e.g. DRVAE latent means.
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), optional
            Weights for the seeding, the centre means and the inertia. Size bounds count
            samples, not weight.

        Returns
        -------
        self : BalancedKMeans

        Raises
        ------
        ValueError
            If ``X`` is not a finite 2D array or has fewer than ``n_clusters`` samples.
        ConfigError
            If ``balance`` is outside ``[0, 1]`` or another parameter is out of range.

        Warns
        -----
        ConvergenceWarning
            If ``max_iter`` is reached before convergence.
        """
        X = check_array(X, dtype=[np.float64, np.float32])
        n, n_features = X.shape
        min_size, max_size = self._check_params(n)
        weights = _check_sample_weight(sample_weight, X, dtype=np.float64)
        rng = np.random.default_rng(self.random_state)
        metric = EuclideanMetric(X, weights)
        variances = np.var(X, axis=0, dtype=np.float64)
        tol = float(self.tol * np.mean(variances)) if n_features else 0.0

        best: tuple[BSKRun, float] | None = None
        for run in range(self.n_init):
            result = bsk_means(metric, self.n_clusters, min_size, max_size, rng, max_iter=self.max_iter,
                               tol=tol, sample_weight=weights)
            inertia = float(np.dot(weights, result.own.astype(np.float64)))
            logger.debug("BalancedKMeans init %d: inertia %.6g after %d iterations", run, inertia, result.n_iter)
            if best is None or inertia < best[1]:
                best = result, inertia
        assert best is not None  # n_init >= 1 was checked
        result, inertia = best
        centres, labels, n_iter, own = result.centres, result.labels, result.n_iter, result.own
        if not result.converged:
            warnings.warn(
                f"BalancedKMeans did not converge in max_iter={self.max_iter} iterations; "
                "increase max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.cluster_centers_ = centres.astype(X.dtype)
        self.labels_ = labels
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        self.distances_ = own.astype(X.dtype)
        self.reliable_ = reliable_mask(own, labels, self.reliable_fraction)
        self.n_features_in_ = n_features
        logger.debug(
            "BalancedKMeans: %d samples, %d clusters, sizes %d..%d (bounds %d..%d), inertia %.6g",
            n, self.n_clusters, np.bincount(labels, minlength=self.n_clusters).min(),
            np.bincount(labels, minlength=self.n_clusters).max(), min_size, max_size, inertia,
        )
        return self

    def predict(self, X: ArrayLike) -> NDArray[np.intp]:
        """Nearest centre for each sample.

        This step does **not** balance cluster sizes: each sample simply goes to its nearest
        centre, so sizes on new data may leave the training bounds.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        X = self._check_X(X)
        return _sq_distances(X, self.cluster_centers_, _row_sq_norms(X)).argmin(axis=1)

    def fit_predict(
        self, X: ArrayLike, y: None = None, sample_weight: ArrayLike | None = None
    ) -> NDArray[np.intp]:
        """Fit and return ``labels_`` (the balanced training labels).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X: ArrayLike) -> NDArray[np.floating]:
        """Euclidean (not squared) distance of each sample to every centre, as in sklearn KMeans.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        distances : ndarray of shape (n_samples, n_clusters)
        """
        X = self._check_X(X)
        return np.sqrt(_sq_distances(X, self.cluster_centers_, _row_sq_norms(X)))

    def fit_transform(
        self, X: ArrayLike, y: None = None, sample_weight: ArrayLike | None = None
    ) -> NDArray[np.floating]:
        """Fit, then :meth:`transform` ``X``."""
        return self.fit(X, sample_weight=sample_weight).transform(X)

    def _check_X(self, X: ArrayLike) -> NDArray:
        check_is_fitted(self, "cluster_centers_")
        X = check_array(X, dtype=[np.float64, np.float32])
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but BalancedKMeans was fitted with {self.n_features_in_}"
            )
        return X
