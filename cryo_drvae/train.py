"""Training and inference of the DRVAE, streaming shuffled batches through a DataLoader.

``Denoiser`` owns the network, its optimizer and a seeded generator, so that training can
stop after any round, be checkpointed, and continue with pseudo targets. Under ``torchrun`` the
network is wrapped in DistributedDataParallel and each rank trains on its own particles.
``pseudo_target_training`` is a round's step 3: ``PseudoTargets`` pull reliable particles towards
their class average placed at their pose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from numpy.typing import NDArray
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from .alignment import transform_images
from .clustering import reliable_mask
from .config import RunConfig, TrainConfig
from .distributed import Comm
from .errors import AbortRequested
from .model import DRVAE, drvae_loss
from .progress import bar as tqdm
from .store import RowStore

if TYPE_CHECKING:
    from .preprocess import WorkingSet
    from .refine import Assignment, Refiner

logger = logging.getLogger(__name__)

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingPairs(Dataset):
    """``(input, target)`` images: rows of a store, targets from ``target_fn(index, inputs)``."""

    def __init__(self, inputs: RowStore, target_fn: TargetFn | None = None):
        self.inputs, self.target_fn = inputs, target_fn

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitems__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(index, dtype=torch.int64)
        x = self.inputs.take(rows.numpy())
        return x, (x if self.target_fn is None else self.target_fn(rows, x))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class Denoiser:
    """A DRVAE with its optimizer: ``train`` for some epochs, ``denoise`` a set of images."""

    def __init__(self, box_size: int, cfg: TrainConfig, device: torch.device, seed: int,
                 comm: Comm = Comm(), workers: int = 0):
        self.cfg, self.device, self.comm, self.workers = cfg, device, comm, workers
        torch.manual_seed(seed)
        self.model = DRVAE(box_size, cfg.latent_dim, cfg.channels).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs_done = 0

    def _network(self) -> torch.nn.Module:
        if not self.comm.active:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _loader(self, pairs: TrainingPairs) -> DataLoader:
        if self.comm.active:
            sampler = DistributedSampler(pairs, self.comm.world_size, self.comm.rank,
                                         seed=int(torch.randint(1 << 30, (1,), generator=self.generator)))
            sampler.set_epoch(self.epochs_done)
        else:
            sampler = RandomSampler(pairs, generator=self.generator)
        return DataLoader(pairs, batch_size=self.cfg.batch_size, sampler=sampler, collate_fn=_keep_batch,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda")

    def train(self, pairs: TrainingPairs, epochs: int,
              should_abort: Callable[[], bool] = lambda: False) -> float:
        """Train ``epochs`` shuffled passes over ``pairs``; returns the last mean loss."""
        self.model.train()
        network = self._network()
        mean_loss = float("nan")
        for _ in tqdm(range(epochs), desc="DRVAE epochs", disable=None, leave=False):
            total, count = 0.0, 0
            for x, y in self._loader(pairs):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                quarter_turns = int(torch.randint(4, (1,), generator=self.generator))
                x, y = torch.rot90(x, quarter_turns, (1, 2)), torch.rot90(y, quarter_turns, (1, 2))
                # bf16 autocast on GPUs (the loss is summed in float32); full precision on CPUs
                with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                    recon, mean, logvar = network(x)
                loss, _, _ = drvae_loss(recon.float(), y, mean.float(), logvar.float(), self.cfg.kl_weight)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach()) * len(x)
                count += len(x)
            if should_abort():
                raise AbortRequested("abort requested during DRVAE training")
            self.epochs_done += 1
            totals = self.comm.sum(torch.tensor([total, float(count)], dtype=torch.float64))
            mean_loss = float(totals[0] / totals[1].clamp(min=1))
            logger.debug("DRVAE epoch %d loss %.5f", self.epochs_done, mean_loss)
        return mean_loss

    @torch.no_grad()
    def denoise(self, inputs: RowStore, batch_size: int = 1024) -> torch.Tensor:
        """Denoised ``(n, box, box)`` images (latent mean decoded), on the CPU."""
        self.model.eval()
        out = torch.empty(inputs.shape)
        for start, rows in inputs.chunks(batch_size):
            x = rows.to(self.device)
            out[start:start + len(rows)] = self.model.decode(self.model.encode(x)[0]).cpu()
        return out
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epochs_done = int(state["epochs_done"])


def pseudo_target_training(refiner: Refiner, ws: WorkingSet, assignment: Assignment, centres: torch.Tensor,
                           denoiser: Denoiser, cfg: RunConfig, abort: Callable[[], bool]) -> float:
    """Step 3: reliable particles learn towards their class average (``centres``) placed at their pose."""
    reliable = reliable_mask(assignment.cost, assignment.labels, cfg.cluster.reliable_fraction)
    mine = refiner.comm.shard(refiner.n_total)
    psi, shift = refiner.grid.decode(assignment.pose[mine])
    target = PseudoTargets(centres, assignment.labels[mine], reliable[mine], psi, shift,
                           cfg.train.pseudo_target_weight)
    return denoiser.train(TrainingPairs(ws.flipped, target), cfg.train.epochs_per_round, abort)


@dataclass
class PseudoTargets:
    """Targets of step 3: for reliable particles, a blend with their class centre placed at their pose."""

    centres: torch.Tensor      # (K, W, W)
    labels: NDArray
    reliable: NDArray
    psi: NDArray
    shift: NDArray
    weight: float

    def __call__(self, rows: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        pick = self.reliable[rows.numpy()]
        if not pick.any():
            return images
        index = rows.numpy()[pick]
        placed = transform_images(self.centres[torch.from_numpy(self.labels[index])],
                                  torch.from_numpy(self.psi[index]).float(),
                                  torch.from_numpy(self.shift[index]).float())
        targets = images.clone()
        targets[torch.from_numpy(pick)] = (1 - self.weight) * images[torch.from_numpy(pick)] + self.weight * placed
        return targets
