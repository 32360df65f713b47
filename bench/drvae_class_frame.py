"""Issue 11's three uses of a DRVAE trained in the class frame, each measured from one grown state.

From the classes found by class growing (the default start), every variant runs 4 EM steps:

* ``base``          plain EM (the default path);
* ``prior L``       use 1: after each M-step a reference becomes (1 - L) x itself + L x the mean of its
                    members' DRVAE-denoised aligned images (at the reference's power per shell);
* ``... +pseudo``   use 3: the DRVAE also trained with pseudo targets (reliable half of each class
                    towards its reference, 50/50 with the particle);
* ``latent``        use 2: BalancedKMeans (BSK-means++) on the DRVAE latents of the aligned particles
                    proposes a whole new partition, then EM; a proposal would be kept only if its
                    likelihood beat ``base``.

Prints accuracy, log-likelihood and the DRVAE's training CPU time. Usage::

    python bench/drvae_class_frame.py SIM_DIR [--diameter 156.9] [--epochs 8]

``SIM_DIR`` is a folder written by ``cryo-drvae simulate`` (particles.star + truth.csv).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryo_drvae import checks
from cryo_drvae.alignment import transform_images
from cryo_drvae.clustering import BalancedKMeans, reliable_mask
from cryo_drvae.config import ClusterConfig, TrainConfig
from cryo_drvae.ctf import params_from_particles
from cryo_drvae.evaluate import score_labels
from cryo_drvae.fourier import shell_sum
from cryo_drvae.preprocess import choose_working_box, plan_preparation, prepare_working_set
from cryo_drvae.refine import EMState, Refiner, posterior, total_log_likelihood
from cryo_drvae.splitting import grow_classes
from cryo_drvae.stack import ParticleStack
from cryo_drvae.star_io import pixel_sizes, read_particles
from cryo_drvae.store import RowStore
from cryo_drvae.train import Denoiser, TrainingPairs

EM_STEPS = 4


def load(sim_dir: Path, diameter: float):
    """The working set exactly as ``classify`` prepares it, and the true classes (0-based)."""
    table = read_particles(sim_dir / "particles.star")
    stack = ParticleStack.from_table(table, data_dir=sim_dir)
    ctf = params_from_particles(table.per_particle(), str(table.path))
    pixel = float(pixel_sizes(table)[0])
    diameter = diameter or 0.6 * stack.box_size * pixel
    stack.normalise(checks.background_radius_px(diameter, stack.box_size, pixel))
    box = choose_working_box(stack.box_size, pixel, particle_diameter=diameter)
    ws = prepare_working_set(stack, plan_preparation(stack, ctf, pixel, diameter, box, 0))
    return ws, pd.read_csv(sim_dir / "truth.csv")["class"].to_numpy() - 1


class ClassFrame:
    """Particles aligned to their classes, a DRVAE trained on them, and the variants above."""

    def __init__(self, ref: Refiner, truth: np.ndarray, grown: EMState):
        self.ref, self.truth, self.grown = ref, truth, grown
        self.n, self.k = len(truth), grown.refs.shape[0]
        self.labels = posterior(grown.loglik, grown.log_prior).argmax(1)
        self.pose = grown.best_pose[np.arange(self.n), self.labels]
        self.aligned = self.align(self.labels, self.pose)

    def align(self, labels: np.ndarray, pose: np.ndarray) -> torch.Tensor:
        psi, shift = self.ref.grid.decode(pose)
        return transform_images(self.ref.ws.flipped[np.arange(self.n)], torch.from_numpy(psi).float(),
                                torch.from_numpy(shift).float(), to_reference=True)

    def pseudo_targets(self):
        """Use 3: the reliable half of each class learns towards its reference (50/50 with itself)."""
        cost = -self.grown.loglik[np.arange(self.n), self.labels]
        reliable = reliable_mask(cost, self.labels, 0.5)
        refs, labels = self.grown.refs, self.labels

        def target(rows: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            index = rows.numpy()
            pick = torch.from_numpy(reliable[index])
            out = images.clone()
            out[pick] = 0.5 * images[pick] + 0.5 * refs[torch.from_numpy(labels[index[pick.numpy()]])]
            return out
        return target

    def train(self, pseudo: bool, epochs: int) -> tuple[Denoiser, float]:
        denoiser = Denoiser(self.ref.ws.box_size, TrainConfig(), torch.device("cpu"), seed=0)
        pairs = TrainingPairs(RowStore.wrap(self.aligned), self.pseudo_targets() if pseudo else None)
        started = time.process_time()
        denoiser.train(pairs, epochs)
        return denoiser, time.process_time() - started

    def prior(self, denoiser: Denoiser, aligned: torch.Tensor, labels: np.ndarray, refs: torch.Tensor,
              weight: float) -> torch.Tensor:
        """Use 1: references pulled towards their members' denoised mean (at the references' power)."""
        denoised = denoiser.denoise(RowStore.wrap(aligned))
        group = torch.from_numpy(labels)
        means = torch.zeros_like(refs).index_add_(0, group, denoised)
        means /= torch.bincount(group, minlength=self.k).float().clamp(min=1)[:, None, None]
        shells, n_shells = self.ref.shells, self.ref.ws.ctf2_shells.shape[1]
        spectrum, own = torch.fft.rfft2(means, norm="ortho"), torch.fft.rfft2(refs, norm="ortho")
        gain = torch.sqrt(shell_sum(own.abs() ** 2, shells, n_shells)
                          / shell_sum(spectrum.abs() ** 2, shells, n_shells).clamp(min=1e-12))
        means = torch.fft.irfft2(spectrum * gain[:, shells], s=refs.shape[-2:], norm="ortho")
        return (1 - weight) * refs + weight * means * self.ref.solvent_mask

    def em(self, refs: torch.Tensor, log_prior: np.ndarray, denoiser: Denoiser | None = None,
           weight: float = 0.0) -> EMState:
        for _ in range(EM_STEPS):
            step = self.ref.em_step(refs, log_prior, floor=0.0)
            refs, log_prior = step.refs, step.log_prior
            if denoiser is not None:
                labels = posterior(step.loglik, step.log_prior).argmax(1)
                pose = step.best_pose[np.arange(self.n), labels]
                refs = self.prior(denoiser, self.align(labels, pose), labels, refs, weight)
        last = self.ref.em_step(refs, log_prior, floor=0.0)
        return EMState(refs, log_prior, last.loglik, last.best_pose)

    def line(self, name: str, state: EMState, extra: str = "") -> str:
        labels = posterior(state.loglik, state.log_prior).argmax(1)
        return (f"{name:16s} accuracy {score_labels(self.truth, labels).accuracy:.3f}  "
                f"log-likelihood {total_log_likelihood(state):10.1f}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sim_dir", type=Path)
    parser.add_argument("--diameter", type=float, default=0.0, help="particle diameter in Å (0: 60%% of the box)")
    parser.add_argument("--epochs", type=int, default=8, help="DRVAE epochs on the aligned particles")
    parser.add_argument("--K", type=int, default=0, help="classes (0: the number of true classes)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ws, truth = load(args.sim_dir, args.diameter)
    k = args.K or int(truth.max()) + 1
    ref = Refiner(ws, ClusterConfig(n_classes=k), torch.device("cpu"))
    started = time.process_time()
    grown = grow_classes(ref, k)
    frame = ClassFrame(ref, truth, grown)
    base = frame.em(grown.refs, grown.log_prior)
    print(frame.line("base", base, f"(growing + EM {time.process_time() - started:.0f} CPU-s)"), flush=True)
    for pseudo in (False, True):
        tag = " +pseudo" if pseudo else ""
        denoiser, seconds = frame.train(pseudo, args.epochs)
        for weight in (1.0, 0.5):
            start = frame.prior(denoiser, frame.aligned, frame.labels, grown.refs, weight)
            print(frame.line(f"prior {weight:g}{tag}", frame.em(start, grown.log_prior, denoiser, weight),
                             f"(DRVAE {args.epochs} epochs: {seconds:.0f} CPU-s)"), flush=True)
        with torch.no_grad():
            latent = torch.cat([denoiser.model.encode(frame.aligned[i:i + 512])[0]
                                for i in range(0, frame.n, 512)]).numpy()
        kmeans = BalancedKMeans(n_clusters=k, balance=0.2, n_init=3, random_state=0).fit(latent)
        proposal = ref.references(ref.statistics_from_labels(kmeans.labels_, frame.pose))
        state = frame.em(proposal, np.full(k, -np.log(k)))
        print(frame.line(f"latent{tag}", state,
                         f"(BSK-means++ on the latents alone: {score_labels(truth, kmeans.labels_).accuracy:.3f})"),
              flush=True)


if __name__ == "__main__":
    main()
