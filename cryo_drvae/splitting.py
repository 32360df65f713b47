"""Low-SNR initialisation: grow the classes from one by splitting, with coarse-to-fine EM.

Starting K-means++ from single particles fails at low SNR (each seed is mostly noise). Here
classes are grown instead: EM over (class, pose) with the exact CTF likelihood from one class;
then, repeatedly, the class whose aligned members are most heterogeneous is split in two
(2-means on the top principal components of its members brought into the reference frame)
and EM continues, until there are K classes. Heterogeneity is measured on what the class model
does not explain (each member minus the reference seen through its own CTF, at its own scale
and pose), against the known noise level: otherwise defocus, amplitude, the residual pose of a
discrete grid, or merely a large class, look like two structures, and large classes get split
while small ones stay merged. The references are low-passed to a resolution
that rises with the number of classes (annealing), which keeps early alignment from locking
onto noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from numpy.typing import NDArray

from .alignment import transform_images
from .errors import AbortRequested
from .fourier import band_crop, circular_mask, crop_spectrum, frequency_radius, lowpass
from .progress import WorkClock, format_seconds
from .refine import EMState, Refiner, posterior, total_log_likelihood

logger = logging.getLogger(__name__)

MOVE_SPLIT_FRACTION = 0.5   # split moves separate members on this fraction of the reference resolution
TAIL_FRACTION = 0.1         # a move may also seed a class from this share of a class at either end of its
                            # first principal component: a small view hidden in a large class (at SNR 0.02
                            # it sits at one end, not in a half; measured: docs/method.md)
TAIL_CLASS_SIZE = 1.5       # ... of a class at least this many times the mean class size
PRIOR_FLOOR = 1e-6      # a class given no weight keeps a finite log-prior (it may be re-seeded)


def analysis_box(box: int, max_shell: float) -> int:
    """The smallest even box that holds shells up to ``max_shell`` with a margin for the bilinear
    resampling (at most ``box``): the split analysis is band-limited, so it runs there."""
    return int(min(box, 2 * int(np.ceil(1.25 * max_shell)) + 2))


def aligned_members(ref: Refiner, members: NDArray, pose: NDArray, max_shell: float) -> torch.Tensor:
    """Phase-flipped members brought into the reference frame, low-passed, masked, flattened
    (on the :func:`analysis_box` of ``max_shell``)."""
    size = analysis_box(ref.ws.box_size, max_shell)
    scale = size / ref.ws.box_size
    psi, shift = ref.grid.decode(pose)
    imgs = transform_images(band_crop(ref.ws.flipped[members], size), torch.from_numpy(psi).float(),
                            torch.from_numpy(shift * scale).float(), to_reference=True)
    imgs = lowpass(imgs, max_shell)
    mask = torch.from_numpy(circular_mask(size, ref.ws.particle_radius * scale))
    return imgs[:, mask]


def member_residuals(ref: Refiner, members: NDArray, pose: NDArray, reference: torch.Tensor,
                     max_shell: float, chunk: int = 1024) -> torch.Tensor:
    """What the class model does not explain in each member, in the reference frame.

    Each phase-flipped member, brought into the reference frame and low-passed, minus its least-squares
    fit by the reference seen through that member's own |CTF| and by the reference's derivatives
    in angle and shift (through the same |CTF|). Defocus, amplitude and the residual pose of a
    discrete grid then no longer look like heterogeneity; different structures still do.
    Returns ``(m, M)`` like :func:`aligned_members`; members are processed ``chunk`` at a time.
    """
    box = analysis_box(ref.ws.box_size, max_shell)
    scale = box / ref.ws.box_size
    reference = band_crop(reference[None], box)[0]
    step = 2.0
    moved = transform_images(reference.expand(6, box, box),
                             torch.tensor([step, -step, 0.0, 0.0, 0.0, 0.0]),
                             torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0], [-0.5, 0.0],
                                           [0.0, 0.5], [0.0, -0.5]]))
    basis = torch.stack([reference, moved[0] - moved[1], moved[2] - moved[3], moved[4] - moved[5]])
    spectra = torch.fft.fft2(basis)                                          # (4, W, W)
    mask = torch.from_numpy(circular_mask(box, ref.ws.particle_radius * scale))
    out = []
    for start in range(0, len(members), chunk):
        part, part_pose = members[start:start + chunk], pose[start:start + chunk]
        psi, _ = ref.grid.decode(part_pose)
        psi_t = torch.from_numpy(psi).float()
        ctf = crop_spectrum(ref.ws.effective_ctf(part), box)                 # (c, W, W) |CTF x w|
        # it turns with the member into the reference frame (the shift does not move it)
        ctf = torch.fft.ifftshift(transform_images(torch.fft.fftshift(ctf, dim=(-2, -1)), psi_t,
                                                   torch.zeros(len(part), 2), to_reference=True),
                                  dim=(-2, -1))
        models = torch.fft.ifft2(ctf[:, None] * spectra[None]).real          # (c, 4, W, W)
        models = lowpass(models.reshape(-1, box, box), max_shell).reshape(len(part), 4, box, box)
        models = models[:, :, mask].double()                                 # (c, 4, M)
        x = aligned_members(ref, part, part_pose, max_shell).double()        # (c, M)
        gram = models @ models.transpose(1, 2) + 1e-9 * torch.eye(4, dtype=torch.float64)
        coef = torch.linalg.solve(gram, models @ x[:, :, None])              # (c, 4, 1)
        out.append((x - (models.transpose(1, 2) @ coef)[:, :, 0]).float())
    return torch.cat(out)


def split_score(x: torch.Tensor, noise_var: float, d_eff: int = 0) -> tuple[float, torch.Tensor]:
    """Excess of the top eigenvalue over the Marchenko-Pastur noise edge, times the class size.

    Below the edge (nothing detectable) the score is the relative excess, in (-1, 0], so that
    classes still rank.
    """
    m, d = x.shape
    xc = (x - x.mean(0, keepdim=True)).double()
    cov = (xc.t() @ xc / max(m - 1, 1)).numpy()
    # numpy's LAPACK eigh on one thread: torch's CPU eigh, or OpenBLAS threads competing with
    # torch's OpenMP threads, were 10-100x slower on this 700 x 700 covariance
    with threadpool_limits(1):
        evals, evecs = np.linalg.eigh(cov)                   # ascending
    lam = evals[::-1]
    vt = torch.from_numpy(np.ascontiguousarray(evecs[:, ::-1][:, :3].T)).float()
    # noise level: median eigenvalue within the effective dimension of the low-passed subspace
    d_eff = int(np.clip(d_eff or d, 2, min(d, m)))
    # the median is biased low (the masked, low-passed noise spectrum is not flat), so the
    # known noise variance sets the edge where it is higher
    noise = max(float(np.median(lam[:d_eff])), noise_var)
    edge = noise * (1 + np.sqrt(d_eff / max(m, 1))) ** 2
    excess = lam[0] - edge
    return float(m * excess if excess > 0 else excess / edge), vt


def tails(x: torch.Tensor, vt: torch.Tensor, fraction: float = TAIL_FRACTION) -> tuple[NDArray, NDArray]:
    """The members at the low and at the high end of the first principal component."""
    z = ((x - x.mean(0, keepdim=True)) @ vt[:1].t()).numpy()[:, 0]
    low, high = np.quantile(z, [fraction, 1.0 - fraction])
    return z < low, z > high


def two_means(x: torch.Tensor, vt: torch.Tensor, n_iter: int = 10) -> NDArray:
    """2-means on the top principal components, started from the sign of the first."""
    z = ((x - x.mean(0, keepdim=True)) @ vt.t()).numpy()
    side = z[:, 0] > np.median(z[:, 0])
    for _ in range(n_iter):
        if side.all() or (~side).all():
            break
        c1, c0 = z[side].mean(0), z[~side].mean(0)
        new = ((z - c1) ** 2).sum(1) < ((z - c0) ** 2).sum(1)
        if np.array_equal(new, side):
            break
        side = new
    return side


@dataclass
class SplitCandidate:
    """A class whose members the class model explains badly, with a part of its members to split off."""

    score: float                 # excess top eigenvalue over the noise edge, times the class size
    index: int                   # the class
    members: NDArray             # its particles
    side: NDArray                # (m,) bool: the members that go to the new class
    part: str = "half"           # what ``side`` is: the 2-means "half", or the "low tail" / "high tail"


def effective_dimension(box: int, radius: float, shell: float) -> int:
    """Dimensions of masked images low-passed to ``shell``: the Fourier components inside the
    shell times the share of the box the mask covers."""
    inside = float((frequency_radius(box, rfft=False) <= shell).sum())
    return int(inside * min(1.0, np.pi * radius ** 2 / box ** 2))


def split_candidates(ref: Refiner, state: EMState, split_shell: float, with_tails: bool = False) -> list[SplitCandidate]:
    """Every class with enough members, scored for a split, most heterogeneous first (2-means
    halves; ``with_tails``: the two tails too of each class 1.5x the mean size or more, after its halves)."""
    k = state.refs.shape[0]
    labels = posterior(state.loglik, state.log_prior).argmax(1)
    d_eff = effective_dimension(ref.ws.box_size, ref.ws.particle_radius, split_shell)
    sizes = np.bincount(labels, minlength=k)
    smallest = min(20, int(sizes.max()))          # fall back to the largest class if all are tiny
    candidates = []
    for j in range(k):
        members = np.nonzero(labels == j)[0]
        if len(members) < max(smallest, 2):
            continue
        x = member_residuals(ref, members, state.best_pose[members, j], state.refs[j], split_shell)
        score, vt = split_score(x, ref.ws.noise_var, d_eff)
        candidates.append(SplitCandidate(score, j, members, two_means(x, vt)))
        if with_tails and holds_tails(len(members), len(labels), k):   # a small view hides in a large class
            low, high = tails(x, vt)
            candidates += [SplitCandidate(score, j, members, high, "high tail"),
                           SplitCandidate(score, j, members, low, "low tail")]
    candidates.sort(key=lambda c: -c.score)
    return candidates


def apply_split(ref: Refiner, state: EMState, candidate: SplitCandidate, max_shell: float,
                slot: int | None = None) -> EMState:
    """``state`` with ``candidate``'s class replaced by its first half and the second half in
    ``slot`` (a class given up), or appended as a new class when ``slot`` is None."""
    j, members, side = candidate.index, candidate.members, candidate.side
    halves = ref.references(ref.statistics_from_labels(side.astype(np.int64), state.best_pose[members, j],
                                                       n_classes=2, members=members))
    halves = lowpass(halves, max_shell) * ref.solvent_mask
    refs, prior = state.refs.clone(), np.exp(state.log_prior)
    frac = float(side.mean())
    if slot is None:
        refs = torch.cat([refs, halves[1:]], 0)
        prior = np.append(prior, prior[j] * frac)
    else:
        refs[slot] = halves[1]
        prior[slot] = prior[j] * frac
    refs[j] = halves[0]
    prior[j] *= 1 - frac
    prior = np.maximum(prior, PRIOR_FLOOR)
    return EMState(refs, np.log(prior / prior.sum()), state.loglik, state.best_pose)


def split_classes(ref: Refiner, state: EMState, max_shell: float, split_shell: float,
                  n_splits: int = 1) -> EMState:
    """Split the ``n_splits`` classes of ``state`` whose members the class model explains worst, in two."""
    candidates = split_candidates(ref, state, split_shell)
    if not candidates:                 # too few particles to split: duplicate the likeliest class
        prior = np.exp(state.log_prior)
        j = int(np.argmax(prior))
        prior = np.append(prior, prior[j] / 2)
        prior[j] /= 2
        return EMState(torch.cat([state.refs, state.refs[j:j + 1]], 0), np.log(prior / prior.sum()),
                       state.loglik, state.best_pose)
    logger.debug("split scores (class:size:score) %s",
                 " ".join(f"{c.index}:{len(c.members)}:{c.score:.3g}" for c in candidates))
    for candidate in candidates[:n_splits]:
        state = apply_split(ref, state, candidate, max_shell)
    return state


def splits_per_stage(k: int) -> int:
    """Classes split at once when there are ``k``: one at a time up to 15, then k/8 (geometric growth,
    so that growing to K costs O(K) class-steps of EM instead of O(K^2))."""
    return max(1, k // 8)


def growth_work(n_classes: int, rounds_per_split: int, settle_rounds: int) -> list[float]:
    """Class-EM steps of each growth stage (k classes x its rounds), then of the settling steps:
    what the time left of class growing is estimated from."""
    work, k = [], 1
    while True:
        work.append(float(k * (rounds_per_split + (k == 1))))
        if k >= n_classes:
            break
        k += min(splits_per_stage(k), n_classes - k)
    return work + [float(n_classes)] * settle_rounds


def grow_classes(ref: Refiner, n_classes: int, rounds_per_split: int = 2, shell_start: float = 5.0,
                 settle_rounds: int = 6, settle_tolerance: float = 0.0025, split_merge: bool = True,
                 should_abort: Callable[[], bool] = lambda: False) -> EMState:
    """EM from one class, splitting the most heterogeneous classes until there are ``n_classes``.

    The references are low-passed to a shell that rises linearly from ``shell_start`` (one class)
    to Nyquist (``n_classes``), so the early, coarse alignments cannot lock onto noise.
    At ``n_classes``, up to ``settle_rounds`` more EM steps at full resolution (until fewer than
    ``settle_tolerance`` of the labels change): the last classes are otherwise handed on after two
    steps, and a split that found nothing real has not yet given its members back.
    """
    shell_end = ref.ws.box_size // 2
    n = len(ref.weighted)
    zeros = np.zeros(n, dtype=np.int64)
    refs = lowpass(ref.references(ref.statistics_from_labels(zeros, zeros, n_classes=1)), shell_start)
    state = EMState(refs * ref.solvent_mask, np.zeros(1), None, None)
    k, stage = 1, 0
    clock = WorkClock(growth_work(n_classes, rounds_per_split, settle_rounds))
    while True:
        shell = shell_start + (shell_end - shell_start) * min(1.0, (k - 1) / max(n_classes - 1, 1))
        for _ in range(rounds_per_split + (k == 1)):
            state = ref.em_step(state.refs, state.log_prior, shell, floor=0.0)
        if should_abort():
            raise AbortRequested("abort requested while growing classes")
        clock.step_done(stage)
        stage += 1
        logger.info("grown to %d of %d classes (references filtered to %.0f Å; %s)", k, n_classes,
                    ref.ws.box_size * ref.ws.pixel_size / max(shell, 1.0),
                    format_seconds(clock.seconds_left()) or "time left unknown")
        if k >= n_classes:
            break
        state = split_classes(ref, state, shell, shell, min(splits_per_stage(k), n_classes - k))
        k = state.refs.shape[0]
    if not split_merge:
        return settle(ref, state, shell_end, settle_rounds, settle_tolerance)
    state = settle(ref, state, shell_end, min(settle_rounds, 3), settle_tolerance)
    moved = improve_by_moves(ref, state, shell_end, should_abort=should_abort)
    if moved is not state:
        moved = settle(ref, moved, shell_end, settle_rounds, settle_tolerance)
    return moved


def settle(ref: Refiner, state: EMState, shell: float, max_steps: int, tolerance: float) -> EMState:
    """EM steps until fewer than ``tolerance`` of the labels change (at most ``max_steps``).

    Returns the references met on the way with the highest likelihood, with their own E-step (a
    guard: with references that are not the exact M-step, such as a re-chosen common band limit, EM
    need not raise the likelihood).
    """
    labels = posterior(state.loglik, state.log_prior).argmax(1)
    best, best_value = state, -np.inf
    for step in range(max_steps):
        stepped = ref.em_step(state.refs, state.log_prior, shell, floor=0.0)
        scored = EMState(state.refs, state.log_prior, stepped.loglik, stepped.best_pose)
        value = total_log_likelihood(scored)
        if value > best_value:
            best, best_value = scored, value
        new = posterior(stepped.loglik, state.log_prior).argmax(1)
        changed = float(np.mean(new != labels))
        labels, state = new, stepped
        logger.info("settling EM step %d: %.1f%% of labels changed", step + 1, 100 * changed)
        if changed < tolerance:
            break
    return best


def deletion_costs(state: EMState) -> NDArray:
    """Per class, the log-likelihood lost if its members went to their next most likely class.

    Near 0 for an empty class or one that duplicates a neighbour: the cheapest slot to re-seed.
    """
    joint = state.loglik.astype(np.float64) + state.log_prior[None]
    labels = joint.argmax(1)
    second = np.partition(joint, -2, axis=1)[:, -2] if joint.shape[1] > 1 else joint[:, 0] - np.inf
    loss = joint[np.arange(len(joint)), labels] - second
    return np.bincount(labels, weights=loss, minlength=joint.shape[1])


def improve_by_moves(ref: Refiner, state: EMState, shell: float, em_steps: int = 6, max_trials: int = 0,
                     patience: int = 4, should_abort: Callable[[], bool] = lambda: False) -> EMState:
    """Split-and-merge moves at fixed K, each kept only if the total likelihood rises.

    A move gives up the class whose members are best explained elsewhere (an empty class, or one
    half of a view that was split) and uses its slot for one half, or one tail, of the most
    heterogeneous or largest class (two views merged, or a small view hidden in a large one);
    ``em_steps`` EM steps later the marginal likelihood of all the data decides (or, with
    ``move_criterion = "evidence"``, the likelihood with the references integrated out too:
    :class:`MoveJudge`). This escapes the merged-and-split states that EM alone cannot leave.
    Halves first; tails only once no half move is left (tried earlier, a tail move with a small gain
    led balanced sets away from the moves that undo a merged pair).
    """
    k = state.refs.shape[0]
    if k < 2:
        return state
    judge = MoveJudge(ref, state, ref.cfg.move_criterion)
    moves = MovePhase(ref, judge, shell, em_steps, max_trials or 2 * k + 4, patience, should_abort)
    state = moves.run(state, parts=("half",))
    if not has_tail_class(state):
        return state                  # no class large enough to hide a small view: no split analysis
    return moves.run(state, parts=("high tail", "low tail"))


def holds_tails(size: int, n: int, k: int) -> bool:
    """Whether a class of ``size`` of ``n`` particles in ``k`` classes is large enough for tail moves."""
    return size > TAIL_CLASS_SIZE * n / k


def has_tail_class(state: EMState) -> bool:
    """Whether any class is large enough for tail moves."""
    labels = posterior(state.loglik, state.log_prior).argmax(1)
    sizes = np.bincount(labels, minlength=state.refs.shape[0])
    return holds_tails(int(sizes.max()), len(labels), len(sizes))


class MovePhase:
    """Moves of some kinds of split (``parts``) until ``patience`` in a row are undone."""

    def __init__(self, ref: Refiner, judge: "MoveJudge", shell: float, em_steps: int, max_trials: int,
                 patience: int, should_abort: Callable[[], bool]):
        self.ref, self.judge, self.shell, self.em_steps = ref, judge, shell, em_steps
        self.max_trials, self.patience, self.should_abort = max_trials, patience, should_abort
        self.trials = 0

    def candidates(self, state: EMState, parts: tuple[str, ...]) -> list[SplitCandidate]:
        split_shell = MOVE_SPLIT_FRACTION * self.shell   # two merged views differ most at low resolution
        with_tails = any(part != "half" for part in parts)
        return [c for c in split_candidates(self.ref, state, split_shell, with_tails) if c.part in parts]

    def run(self, state: EMState, parts: tuple[str, ...]) -> EMState:
        ref, judge, shell, em_steps, k = self.ref, self.judge, self.shell, self.em_steps, state.refs.shape[0]
        best = judge.value(state)
        rejected: set[tuple[int, int, str]] = set()
        trials = failures = 0
        scored, costs = self.candidates(state, parts), deletion_costs(state)
        while trials < self.max_trials and failures < self.patience:
            move = next_move(ref, costs, scored, rejected)
            if move is None:
                break
            slot, candidate = move
            proposal = apply_split(ref, state, candidate, shell, slot=slot)
            for _ in range(em_steps):
                proposal = ref.partial_em_step(proposal, [slot, candidate.index], shell)
            trials += 1
            self.trials += 1
            value = judge.value(proposal)
            kept = value > best
            logger.info("move %d: class %d re-seeded from the %s of class %d (%d members): "
                        "%s %+.1f, %s", self.trials, slot + 1, candidate.part, candidate.index + 1,
                        len(candidate.members), judge.name, value - best, "kept" if kept else "undone")
            if kept:
                state, best, failures = proposal, value, 0
                rejected.clear()
                scored, costs = self.candidates(state, parts), deletion_costs(state)
            else:
                # the same split into a class that costs more to give up cannot do better
                rejected.update((s, candidate.index, candidate.part) for s in range(k) if costs[s] >= costs[slot])
                failures += 1
            if self.should_abort():
                raise AbortRequested("abort requested during split-and-merge moves")
        return state


class MoveJudge:
    """What a move must raise: the marginal likelihood (poses and classes integrated out), or the
    evidence (the references too, under one signal-power prior fixed at the start of the moves)."""

    def __init__(self, ref: Refiner, start: EMState, criterion: str):
        self.ref, self.name = ref, "log evidence" if criterion == "evidence" else "log-likelihood"
        self.power = ref.log_evidence(start)[1] if criterion == "evidence" else None

    def value(self, state: EMState) -> float:
        if self.power is None:
            return total_log_likelihood(state)
        return self.ref.log_evidence(state, self.power)[0]


def next_move(ref: Refiner, costs: NDArray, scored: list[SplitCandidate], rejected: set[tuple[int, int, str]],
              width: int = 3) -> tuple[int, SplitCandidate] | None:
    """The untried (slot, split) pair with the largest predicted gain among the ``width`` best of each
    (``scored``: :func:`split_candidates`, ``costs``: :func:`deletion_costs` of the same state)."""
    # the most heterogeneous classes, and the largest (at low SNR two merged views may not
    # stand out of the noise edge, but their class is about twice the size)
    by_score = list(dict.fromkeys(c.index for c in scored))[:width]
    by_size = list(dict.fromkeys(c.index for c in sorted(scored, key=lambda c: -len(c.members))))[:width]
    splits = [c for c in scored if c.index in set(by_score + by_size)]
    best, choice = -np.inf, None
    for candidate in splits:
        gain = 0.5 * max(candidate.score, 0.0) / ref.ws.noise_var
        for slot in np.argsort(costs)[:width]:
            slot = int(slot)
            if slot == candidate.index or (slot, candidate.index, candidate.part) in rejected:
                continue
            if gain - costs[slot] > best:
                best, choice = gain - costs[slot], (slot, candidate)
    return choice
