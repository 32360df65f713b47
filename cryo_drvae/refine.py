"""Classification rounds: BSK-means++ under alignment, and CTF-aware likelihood refinement.

Two ways of comparing a particle with a class, both minimised over every in-plane pose:

* ``cluster_denoised``: BSK-means++ on DRVAE-denoised images (the one loop,
  ``clustering.bsk_means``) in :class:`AlignedMetric`: the squared distance
  ``min_pose ||d_i - T_pose c_k||^2`` and aligned means.
* ``Refiner.expectation``: the exact CTF-aware log-likelihood of the raw (whitened) particle
  given a class reference, marginalised over poses; the balanced assignment of the same
  BSK-means++ then turns it into labels, and Wiener-filtered averages become the new centres.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.special import logsumexp

from .alignment import EXP_FLOOR, PoseOperator, chunk_size, kept_rotation_scores, make_pose_grid, pose_scores
from .clustering import balanced_assignment, bsk_means, size_bounds
from .config import ClusterConfig
from .distributed import Comm
from .fourier import centred_radius, lowpass, rfft_weights, shell_index, shell_sum, wiener_filter
from .preprocess import WorkingSet
from .progress import bar as tqdm
from .search import MIN_SHORTLISTED_CLASSES, CoarseSearch, Shortlist, high_band_allowance

logger = logging.getLogger(__name__)

ML_REGULARISATION = 1e-2   # x noise variance, added to the summed CTF^2 of a class's references
SHORTLIST_ROW_CLASSES = 8  # classes per particle a shortlisted chunk is sized for (soft statistics)
HARD_SHORTLIST_ROWS = 16384  # particles per shortlisted chunk without statistics (templates built once per chunk)


@dataclass
class Assignment:
    """Hard result of one round, one entry per particle."""

    labels: NDArray[np.int64]       # (n,) 0-based class
    pose: NDArray[np.int64]         # (n,) pose index (PoseGrid) of the particle in its class
    cost: NDArray[np.float64]       # (n,) distance / negative log-likelihood to its class
    confidence: NDArray[np.float64]  # (n,) posterior probability of its class (0-1)


@dataclass
class Statistics:
    """Sufficient statistics for class averages."""

    frame_sums: torch.Tensor       # (K, frame) weighted sums of masked images at their poses (PoseOperator.to_frame)
    ctf2_sums: torch.Tensor        # (K, S) weighted sums of squared effective CTF per shell
    weights: torch.Tensor          # (K,) total weight per class


@dataclass
class EMState:
    """References and priors after a step, with the E-step results that produced them."""

    refs: torch.Tensor             # (K, W, W)
    log_prior: NDArray             # (K,)
    loglik: NDArray | None         # (n, K) class log-likelihoods, poses marginalised
    best_pose: NDArray | None      # (n, K) most likely pose per class


def posterior(loglik: NDArray, log_prior: NDArray) -> NDArray:
    """Class posteriors ``(n, K)`` from log-likelihoods and log-priors."""
    joint = loglik + log_prior[None]
    post = np.exp(joint - joint.max(1, keepdims=True))
    return post / post.sum(1, keepdims=True)


class AlignedMetric:
    """BSK-means++ metric (``clustering.Metric``) of images ``(n, W, W)`` on the refiner's mask:
    ``min_pose ||d_i - T_pose c_k||^2``, the best pose per pair as side information, and centres
    ``(K, W, W)`` that are the members' means brought into the class frame."""

    def __init__(self, refiner: Refiner, images: torch.Tensor):
        self.refiner, self.images, self.n_samples = refiner, images, len(images)
        self.points = images[:, torch.from_numpy(refiner.mask)].contiguous()   # (n, M)
        self.point_norms = (self.points ** 2).sum(-1)

    def centres_at(self, idx: NDArray) -> torch.Tensor:
        return self.images[torch.from_numpy(np.asarray(idx))].clone()

    def distances(self, centres: torch.Tensor) -> tuple[NDArray, NDArray]:
        ref, points, point_norms = self.refiner, self.points, self.point_norms
        templates = ref.op.forward(centres)
        template_norms = (templates ** 2).sum(-1)                       # (K, P)
        dist = np.empty((len(points), len(centres)))
        pose = np.empty((len(points), len(centres)), dtype=np.int64)
        for start in range(0, len(points), ref.batch):
            chunk = points[start:start + ref.batch].to(ref.device)
            cost = template_norms[None] - 2.0 * pose_scores(chunk, templates)
            best, arg = cost.min(dim=2)
            dist[start:start + len(chunk)] = (best + point_norms[start:start + len(chunk), None].to(best)).cpu()
            pose[start:start + len(chunk)] = arg.cpu()
        return dist, pose

    def means(self, labels: NDArray, dist: NDArray, pose: NDArray, old: torch.Tensor) -> torch.Tensor:
        ref, k = self.refiner, len(old)
        own_pose = torch.from_numpy(pose[np.arange(len(labels)), labels])
        frames = torch.zeros(k, ref.op.frame_size, device=ref.device)
        ref.op.place(torch.from_numpy(labels), own_pose, self.points, frames)
        counts = torch.bincount(torch.from_numpy(labels), minlength=k).float().clamp(min=1)
        back = ref.op.from_frame(frames).cpu()
        return back / (counts[:, None, None] * ref.coverage.cpu().clamp(min=0.3))


class Refiner:
    """Alignment and classification machinery for one working set."""

    def __init__(self, ws: WorkingSet, cfg: ClusterConfig, device: torch.device,
                 comm: Comm = Comm(), n_total: int | None = None):
        """``ws`` holds this rank's shard of ``n_total`` particles (all of them on one process)."""
        self.ws, self.cfg, self.device, self.comm = ws, cfg, device, comm
        self.n_total = len(ws) if n_total is None else n_total
        box = ws.box_size
        max_shift = (cfg.max_shift_px or 0.1 * box * ws.scale) / ws.scale
        self.grid = make_pose_grid(cfg.psi_step, max_shift)
        self.mask = ws.mask
        self.op = PoseOperator(box, self.grid, self.mask, device)
        self.coverage = self.op.coverage()
        self.weighted = ws.weighted
        self.shells = torch.from_numpy(shell_index(box)).clamp(max=ws.ctf2_shells.shape[1] - 1)
        self.multiplicity = torch.from_numpy(rfft_weights(box))
        radius = torch.from_numpy(centred_radius(box))
        edge = ws.particle_radius
        self.solvent_mask = (0.5 + 0.5 * torch.cos(torch.clamp((radius - edge) / 3.0, 0, 1) * np.pi)).float()
        self.batch = chunk_size(cfg.n_classes * self.grid.n_poses)
        self.shortlist_batch = chunk_size(SHORTLIST_ROW_CLASSES * self.grid.n_poses)
        self._search: CoarseSearch | None = None
        self.last_shortlist: Shortlist | None = None   # the last E-step's, widened (for the benches)
        logger.debug("alignment grid: %d rotations x %d shifts, %d mask pixels",
                     len(self.grid.psi_deg), len(self.grid.shifts), self.op.n_masked)

    # ---- BSK-means++ on denoised images ------------------------------------------------
    def cluster_denoised(self, denoised: torch.Tensor, rng: np.random.Generator, max_iter: int = 7) -> Assignment:
        """BSK-means++ of ``(n, W, W)`` denoised images under alignment, at most ``max_iter`` centre updates."""
        n, k = len(denoised), self.cfg.n_classes
        lo, hi = size_bounds(n, k, self.cfg.balance)
        run = bsk_means(AlignedMetric(self, denoised), k, lo, hi, rng, max_iter=max_iter)
        return Assignment(run.labels, run.side[np.arange(n), run.labels], run.own, np.ones(n))

    # ---- CTF-aware likelihood on raw particles -----------------------------------------
    def statistics_from_labels(self, labels: NDArray, pose: NDArray, n_classes: int | None = None,
                               members: NDArray | None = None) -> Statistics:
        """Hard-assignment statistics (one pose per particle) of this rank's particles or of ``members``.

        ``labels``/``pose`` are per local particle (per member with ``members``); sums over ranks.
        """
        k = n_classes or self.cfg.n_classes
        frames = torch.zeros(k, self.op.frame_size, device=self.device)
        group = torch.from_numpy(np.asarray(labels, np.int64))
        at = torch.from_numpy(np.asarray(pose, np.int64))
        if members is None:
            ctf2_shells = self.ws.ctf2_shells
            for start, chunk in self.weighted.chunks(self.batch):
                rows = slice(start, start + len(chunk))
                self.op.place(group[rows], at[rows], chunk, frames)
        else:
            ctf2_shells = self.ws.ctf2_shells[torch.from_numpy(np.asarray(members, np.int64))]
            self.op.place(group, at, self.weighted.take(members), frames)
        ctf2 = torch.zeros(k, ctf2_shells.shape[1]).index_add_(0, group, ctf2_shells)
        weights = torch.bincount(group, minlength=k).float()
        return Statistics(self.comm.sum(frames.cpu()), self.comm.sum(ctf2), self.comm.sum(weights))

    def references(self, stats: Statistics) -> torch.Tensor:
        """Wiener-filtered, solvent-masked class references ``(K, W, W)`` from statistics."""
        box = self.ws.box_size
        spectrum = self.aligned_spectrum(stats)                             # (K, W, W/2+1)
        ctf2 = stats.ctf2_sums[:, self.shells]                              # (K, W, W/2+1)
        if self.cfg.reference_filter == "wiener":
            filtered, _ = wiener_filter(spectrum, ctf2, self.ws.noise_var, self.shells)
        else:
            # maximum likelihood: EM then never lowers the likelihood; Wiener shrinkage, weaker in
            # larger classes, let them absorb their neighbours (measured: docs/method.md)
            filtered = spectrum / (ctf2 + ML_REGULARISATION * self.ws.noise_var)
            if self.cfg.reference_filter == "ml_common":
                filtered = filtered * self.common_band(spectrum, ctf2, stats.weights)
        refs = torch.fft.irfft2(filtered, s=(box, box), norm="ortho") * self.solvent_mask
        refs[stats.weights <= 0] = 0.0
        return refs

    def aligned_spectrum(self, stats: Statistics) -> torch.Tensor:
        """Spectrum of the members' sums brought into the reference frame by the exact adjoint of
        the pose operator; not divided by the poses' coverage, so that the references maximise the
        E-step's own likelihood (with that division EM lowered it step after step: docs/method.md)."""
        numerator = self.op.from_frame(stats.frame_sums).cpu()
        return torch.fft.rfft2(numerator, norm="ortho")

    def common_band(self, spectrum: torch.Tensor, ctf2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One resolution limit for every class: the shells where the classes' mean SSNR is >= 1
        (a limit per class would again favour the larger ones)."""
        _, ssnr = wiener_filter(spectrum, ctf2, self.ws.noise_var, self.shells)
        used = weights > 0
        mean = ssnr[used].mean(0) if used.any() else ssnr.mean(0)
        low = torch.nonzero(mean[1:] < 1.0)
        last = int(low[0]) + 1 if len(low) else len(mean)
        return (self.shells < max(last, 3)).float()

    def expectation(self, refs: torch.Tensor, log_prior: torch.Tensor, soft_statistics: bool = True,
                    others: NDArray | None = None) -> tuple[NDArray, NDArray, Statistics | None]:
        """Class log-likelihoods ``(n, K)`` (poses marginalised), best pose per class and soft statistics.

        One streaming pass over this rank's particles; statistics are summed over ranks.
        ``others`` ``(n,)``: log-sum over classes not in ``refs`` of likelihood x prior, for a
        partial E-step (the responsibilities of ``refs`` then share each particle with them).
        With a coarse search (``--search_margin``), each particle is scored exactly only against
        its shortlisted classes (``search.py``); the others get the coarse estimate.
        """
        k, p = refs.shape[0], self.grid.n_poses
        power = shell_sum(torch.fft.rfft2(refs, norm="ortho").abs() ** 2 * self.multiplicity,
                           self.shells, self.ws.ctf2_shells.shape[1])        # (K, S)
        shortlist = self.shortlist(refs, log_prior)
        if shortlist is None:
            templates = self.op.forward(refs).div_(self.ws.noise_var)        # (K, P, M), one copy
        else:   # built one class at a time inside each chunk (ClassTemplates)
            templates = ClassTemplates(self.op, refs, self.ws.noise_var)
        n = len(self.weighted)
        loglik = np.empty((n, k), dtype=np.float32)
        best_pose = np.empty((n, k), dtype=np.int32)
        # (K P, M) pose-resolved sums: as large as the templates, allocated only when wanted
        sums = torch.zeros(k * p if soft_statistics else 0, self.weighted.shape[1], device=self.device)
        ctf2_sums = torch.zeros(k, self.ws.ctf2_shells.shape[1], device=self.device)
        prior = log_prior.to(self.device)
        batch = self.batch
        if shortlist is not None:
            batch = self.shortlist_batch if soft_statistics else HARD_SHORTLIST_ROWS
        progress = tqdm(total=n, desc="aligning", unit="particle", unit_scale=True, disable=None, leave=False)
        for start, rows in self.weighted.chunks(batch):
            progress.update(len(rows))
            part = slice(start, start + len(rows))
            chunk = rows.to(self.device, non_blocking=True)
            ctf2 = self.ws.ctf2_shells[part].to(self.device)
            offset = -0.5 * (ctf2 @ power.t().to(self.device)) / self.ws.noise_var - np.log(p)   # (c, K)
            if shortlist is None:
                class_ll, arg, scored = score_every_class(chunk, templates, offset)
            else:
                allowance = high_band_allowance(ctf2, power.to(self.device), shortlist.shell, self.ws.noise_var)
                class_ll, arg, scored = score_shortlisted(chunk, templates, offset, shortlist, part,
                                                          prior, allowance)
            if soft_statistics:
                joint = class_ll + prior[None]
                if shortlist is not None:
                    joint = joint.masked_fill(~shortlist.chosen[part].to(joint.device), -np.inf)
                norm = torch.logsumexp(joint, dim=1)
                if others is not None:
                    norm = torch.logaddexp(norm, torch.from_numpy(others[part]).to(norm))
                resp = torch.exp(joint - norm[:, None])                      # (c, K)
                for rows_of, j, spread, within in scored:                    # pose weights sum to 1
                    if j is None:                                            # every row, every class
                        post = spread.mul_((resp / within).unsqueeze(2))
                        sums += post.reshape(len(chunk), -1).t() @ chunk
                    else:
                        post = spread.mul_((resp[rows_of, j] / within).unsqueeze(1))
                        sums.view(k, p, -1)[j] += post.t() @ chunk[rows_of]
                ctf2_sums += resp.t() @ ctf2
            loglik[part] = class_ll.cpu().numpy()
            best_pose[part] = arg.cpu().numpy()
        progress.close()
        self.last_shortlist = shortlist
        if shortlist is not None:
            logger.debug("coarse search: %.1f of %d classes per particle scored exactly",
                         shortlist.mean_classes, k)
        if not soft_statistics:
            return loglik, best_pose, None
        weights = ctf2_sums.new_zeros(k)  # filled by the caller from the posteriors
        stats = Statistics(self.comm.sum(self.op.to_frame(sums.reshape(k, p, -1)).cpu()), self.comm.sum(ctf2_sums.cpu()),
                           weights.cpu())
        return loglik, best_pose, stats

    def shortlist(self, refs: torch.Tensor, log_prior: torch.Tensor) -> Shortlist | None:
        """The coarse pass's shortlist of classes per particle, or None: score every class."""
        if refs.shape[0] < MIN_SHORTLISTED_CLASSES or not CoarseSearch.applies(self):
            return None
        if self._search is None:
            self._search = CoarseSearch(self, self.cfg.search_margin)
        return self._search.shortlist(refs, log_prior)

    # ---- model evidence: the likelihood with the references integrated out ----------------
    def log_evidence(self, state: EMState, power: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """log p(data | classes), each class's reference integrated out under a Gaussian prior of
        per-shell ``power`` (default: the signal power these classes estimate), poses marginalised.

        The maximum likelihood of :func:`total_log_likelihood` rises whenever a class is split,
        even in two halves of one view (each half fits its own noise); the evidence charges every
        class for what its reference had to learn (an Occam factor), so splitting a view does not
        pay and two small views merged into a large class do not either. One E-step.
        """
        loglik, _, stats = self.expectation(state.refs, torch.from_numpy(state.log_prior).float())
        post = posterior(loglik, state.log_prior)
        stats.weights = self.comm.sum(torch.from_numpy(post.sum(0, dtype=np.float64)))
        spectrum = self.aligned_spectrum(stats)
        if power is None:
            power = self.signal_power(spectrum, stats)
        value = total_log_likelihood(EMState(state.refs, state.log_prior, loglik, None))
        return value + float(self.occam_terms(spectrum, stats, power).sum()), power

    def signal_power(self, spectrum: torch.Tensor, stats: Statistics) -> torch.Tensor:
        """Per-shell signal power of a class reference, pooled over classes (>= 0); ``spectrum``:
        :meth:`aligned_spectrum` of ``stats``."""
        ctf2 = stats.ctf2_sums[:, self.shells].double()
        safe = ctf2.clamp(min=1e-12)
        excess = ((spectrum.abs().double() ** 2 - ctf2 * self.ws.noise_var) / safe ** 2).clamp(min=0)
        n_shells = stats.ctf2_sums.shape[1]
        num = shell_sum((excess * ctf2).sum(0, keepdim=True), self.shells, n_shells)[0]
        den = shell_sum(ctf2.sum(0, keepdim=True), self.shells, n_shells)[0]
        return num / den.clamp(min=1e-12)

    def occam_terms(self, spectrum: torch.Tensor, stats: Statistics, power: torch.Tensor) -> NDArray:
        """Per class, log evidence minus maximum log-likelihood (<= 0), from the E-step's statistics.

        Per complex Fourier coefficient of a reference with prior power t and summed CTF^2 C:
        ``-log(1 + t C / s2) - |S|^2 / (s2 C) / (1 + t C / s2)``, S the CTF-weighted sum; counted
        once per independent coefficient (half the rfft multiplicity, times the fraction of the
        box inside the solvent mask: the references live there).
        """
        noise = self.ws.noise_var
        ctf2 = stats.ctf2_sums[:, self.shells]
        ratio = power[self.shells][None] * ctf2.double() / noise
        fit = spectrum.abs().double() ** 2 / (noise * ctf2.double().clamp(min=1e-12))
        per_coefficient = -torch.log1p(ratio) - fit / (1.0 + ratio)
        independent = 0.5 * self.multiplicity.double() * float(self.solvent_mask.mean())
        return (per_coefficient * independent * self.fitted_band(spectrum, ctf2, stats.weights)).sum(dim=(1, 2)).numpy()

    def fitted_band(self, spectrum: torch.Tensor, ctf2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The coefficients the references are fitted on (outside, they are 0 and gain nothing)."""
        if self.cfg.reference_filter == "ml_common":
            return self.common_band(spectrum, ctf2, weights).double()
        return torch.ones(self.shells.shape, dtype=torch.float64)

    def em_step(self, refs: torch.Tensor, log_prior: NDArray, max_shell: float | None = None,
                floor: float | None = None) -> EMState:
        """One soft E/M step: new Wiener references (low-passed to ``max_shell``) and class priors.

        The returned log-likelihoods and best poses belong to the references that were given.
        ``floor`` (default: the balance) keeps every class prior >= floor / K.
        """
        loglik, best_pose, stats = self.expectation(refs, torch.from_numpy(log_prior).float())
        post = posterior(loglik, log_prior)
        stats.weights = self.comm.sum(torch.from_numpy(post.sum(0, dtype=np.float64)))
        class_share = (stats.weights / stats.weights.sum()).numpy()
        new_refs = self.band_limited(self.references(stats), max_shell)
        k = refs.shape[0]
        floor = self.cfg.balance if floor is None else floor
        return EMState(new_refs, floored_log_prior(class_share, floor / k), loglik, best_pose)

    def band_limited(self, refs: torch.Tensor, max_shell: float | None) -> torch.Tensor:
        """References low-passed to ``max_shell`` (None or Nyquist: unchanged) and re-masked."""
        if max_shell is None or max_shell >= self.ws.box_size // 2:
            return refs
        return lowpass(refs, max_shell) * self.solvent_mask

    def partial_em_step(self, state: EMState, classes: list[int], max_shell: float | None = None) -> EMState:
        """An EM step for ``classes`` only, the other references held fixed (split-and-merge moves).

        ``state`` must hold the log-likelihoods of all its references; one pass over the data
        scores just the chosen ones, so the step costs ``len(classes) / K`` of a full one.
        """
        loglik, best_pose = state.loglik.copy(), state.best_pose.copy()
        chosen = np.asarray(classes)
        rest = np.setdiff1d(np.arange(state.refs.shape[0]), chosen)
        others = None
        if len(rest):
            joint_rest = loglik[:, rest].astype(np.float64) + state.log_prior[rest][None]
            others = logsumexp(joint_rest, axis=1).astype(np.float32)
        sub_ll, sub_pose, stats = self.expectation(state.refs[chosen], torch.from_numpy(state.log_prior[chosen]).float(),
                                                   others=others)
        loglik[:, chosen], best_pose[:, chosen] = sub_ll, sub_pose
        post = posterior(loglik, state.log_prior)
        stats.weights = self.comm.sum(torch.from_numpy(post[:, chosen].sum(0, dtype=np.float64)))
        new_refs = state.refs.clone()
        new_refs[torch.from_numpy(chosen)] = self.band_limited(self.references(stats), max_shell)
        share = self.comm.sum(torch.from_numpy(post.sum(0, dtype=np.float64))).numpy()
        return EMState(new_refs, floored_log_prior(share / share.sum(), 0.0), loglik, best_pose)

    def bsk_step(self, refs: torch.Tensor, log_prior: NDArray) -> tuple[Assignment, EMState]:
        """One BSK-means++ step in the likelihood metric.

        Balanced labels from the CTF-aware log-likelihoods, then the centres (references) are the
        Wiener averages of exactly those members at their best poses. Hard, balanced centres keep a
        class that happens to be sharper from absorbing its neighbours, which soft EM allows at low SNR.
        """
        loglik, best_pose, _ = self.expectation(refs, torch.from_numpy(log_prior).float(),
                                                soft_statistics=False)
        loglik = self.comm.gather(loglik, self.n_total)
        best_pose = self.comm.gather(best_pose, self.n_total)
        assignment = self.assign(EMState(refs, log_prior, loglik, best_pose))
        mine = self.comm.shard(self.n_total)
        new_refs = self.references(self.statistics_from_labels(assignment.labels[mine], assignment.pose[mine]))
        k = self.cfg.n_classes
        sizes = np.bincount(assignment.labels, minlength=k) / len(assignment.labels)
        return assignment, EMState(new_refs, floored_log_prior(sizes, self.cfg.balance / k), loglik, best_pose)

    def assign(self, state: EMState) -> Assignment:
        """BSK balanced hard labels from an E-step's class log-likelihoods and priors."""
        n, k = state.loglik.shape
        cost = -(state.loglik.astype(np.float64) + state.log_prior[None])
        lo, hi = size_bounds(n, k, self.cfg.balance)
        labels = balanced_assignment(cost - cost.min(1, keepdims=True), lo, hi)
        rows = np.arange(n)
        confidence = posterior(state.loglik, state.log_prior)[rows, labels]
        return Assignment(labels, state.best_pose[rows, labels].astype(np.int64), cost[rows, labels], confidence)


# (rows, class, pose weights, their sums): one class's (m, P) scores; class None: all rows x classes
ScoredRows = tuple[torch.Tensor | None, int | None, torch.Tensor, torch.Tensor]


def score_every_class(chunk: torch.Tensor, templates: torch.Tensor, offset: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, list[ScoredRows]]:
    """Class log-likelihoods ``(c, K)`` and best poses of a chunk against every class at every pose,
    with the pose weights ``exp(score - best)`` for the statistics."""
    # in place on the one (c, K, P) score array: fresh temporaries of that size cost
    # more than the matrix product itself on a CPU
    scores = pose_scores(chunk, templates)
    best, arg = scores.max(dim=2)
    # exp(score - best), clamped at EXP_FLOOR: float32 exp is many times slower on results
    # that underflow (most poses once classes are sharp), and exp(-80) adds nothing
    spread = scores.sub_(best.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_()
    within = spread.sum(2)
    return best + within.log() + offset, arg, [(None, None, spread, within)]


class ClassTemplates:
    """One class's ``(P, M)`` templates at a time, into one reused buffer (``PoseOperator.shifted``):
    holding every class's, ``(K, P, M)``, took 2.8 GB and 2-5 s to fill at K = 100 and a 56 px box."""

    def __init__(self, op: PoseOperator, refs: torch.Tensor, noise_var: float):
        self.op = op
        self.padded = op.padded_rotations(refs).div_(noise_var)             # (K, R, Bp^2)
        self.buffer = torch.empty(op.grid.n_poses, op.n_masked, device=self.padded.device)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.op.shifted(self.padded[j], out=self.buffer)


def score_shortlisted(chunk: torch.Tensor, templates: ClassTemplates, offset: torch.Tensor,
                      shortlist: Shortlist, part: slice, prior: torch.Tensor, allowance: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, list[ScoredRows]]:
    """As :func:`score_every_class` for the shortlisted (particle, class) pairs, then for every other
    pair whose band log-posterior plus ``allowance`` (:func:`search.high_band_allowance`) reaches
    the particle's best exact log-posterior (``shortlist.chosen`` is widened to them). The pairs
    left get the coarse log-likelihood moved by the particle's fine-minus-coarse difference on
    its class of best coarse log-posterior, and the coarse pose."""
    chosen = shortlist.chosen[part].to(chunk.device)
    coarse = shortlist.coarse_ll[part].to(chunk.device)
    class_ll = torch.empty_like(offset)
    arg = shortlist.fine_pose[part].to(chunk.device).clone()
    scored = score_pairs(chunk, templates, offset, shortlist, part, chosen, class_ll, arg)
    best = (class_ll + prior[None]).masked_fill(~chosen, -np.inf).amax(1, keepdim=True)
    reach = ~chosen & (coarse + prior[None] + allowance >= best)
    if reach.any():
        scored += score_pairs(chunk, templates, offset, shortlist, part, reach, class_ll, arg)
        chosen |= reach
        shortlist.chosen[part] = chosen.to(shortlist.chosen.device)
    top = shortlist.best[part].to(chunk.device)                              # chosen by construction
    moved = coarse + (class_ll.gather(1, top) - coarse.gather(1, top))
    return torch.where(chosen, class_ll, moved), arg, scored


def score_pairs(chunk: torch.Tensor, templates: ClassTemplates, offset: torch.Tensor, shortlist: Shortlist,
                part: slice, pairs: torch.Tensor, class_ll: torch.Tensor, arg: torch.Tensor) -> list[ScoredRows]:
    """Exact log-likelihoods and best poses of the ``(c, K)`` ``pairs`` of a chunk, written into
    ``class_ll`` and ``arg``, on the rotations the band pass kept; their pose weights."""
    scored = []
    n_psi = templates.op.grid.psi_deg.size
    for j in torch.nonzero(pairs.any(0)).flatten().tolist():
        rows = torch.nonzero(pairs[:, j]).flatten()
        keep = shortlist.rotations_of(rows.cpu() + part.start, j, n_psi).to(chunk.device)
        scores = kept_rotation_scores(chunk[rows], templates[j], keep)     # (m, P)
        best, arg[rows, j] = scores.max(dim=1)
        spread = scores.sub_(best.unsqueeze(1)).clamp_(min=EXP_FLOOR).exp_()
        within = spread.sum(1)
        class_ll[rows, j] = best + within.log() + offset[rows, j]
        scored.append((rows, j, spread, within))
    return scored


def floored_log_prior(shares: NDArray, floor: float) -> NDArray:
    """Normalised log class priors with every share at least ``floor`` (and never 0: a class that
    lost all its members keeps a finite cost, so it can be re-seeded)."""
    prior = np.maximum(np.nan_to_num(shares, nan=0.0), max(floor, 1e-6 / max(len(shares), 1)))
    return np.log(prior / prior.sum())


def total_log_likelihood(state: EMState) -> float:
    """log p(data | references, priors), poses and classes marginalised, from an E-step's results."""
    return float(logsumexp(state.loglik.astype(np.float64) + state.log_prior[None], axis=1).sum())
