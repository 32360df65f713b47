"""Training and inference of the DRVAE on in-memory working images.

``Denoiser`` owns the network, its optimizer and a seeded generator, so that training can
stop after any round, be checkpointed, and continue with pseudo targets.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import AbortRequested
from .model import DRVAE, drvae_loss

logger = logging.getLogger(__name__)


class Denoiser:
    """A DRVAE with its optimizer: ``train`` for some epochs, ``denoise`` a set of images."""

    def __init__(self, box_size: int, cfg: TrainConfig, device: torch.device, seed: int):
        self.cfg = cfg
        self.device = device
        torch.manual_seed(seed)
        self.model = DRVAE(box_size, cfg.latent_dim, cfg.channels).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs_done = 0

    def train(self, inputs: torch.Tensor, targets: torch.Tensor, epochs: int,
              should_abort: Callable[[], bool] = lambda: False) -> float:
        """Train ``epochs`` passes over ``(n, box, box)`` inputs towards targets; returns the last mean loss."""
        self.model.train()
        n, batch = inputs.shape[0], self.cfg.batch_size
        mean_loss = float("nan")
        for _ in tqdm(range(epochs), desc="DRVAE epochs", disable=None, leave=False):
            order = torch.randperm(n, generator=self.generator)
            total, count = 0.0, 0
            for start in range(0, n, batch):
                index = order[start:start + batch]
                x = inputs[index].to(self.device, non_blocking=True)
                y = targets[index].to(self.device, non_blocking=True)
                quarter_turns = int(torch.randint(4, (1,), generator=self.generator))
                x, y = torch.rot90(x, quarter_turns, (1, 2)), torch.rot90(y, quarter_turns, (1, 2))
                recon, mean, logvar = self.model(x)
                loss, _, _ = drvae_loss(recon, y, mean, logvar, self.cfg.kl_weight)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach()) * len(index)
                count += len(index)
            if should_abort():
                raise AbortRequested("abort requested during DRVAE training")
            self.epochs_done += 1
            mean_loss = total / max(count, 1)
            logger.debug("DRVAE epoch %d loss %.5f", self.epochs_done, mean_loss)
        return mean_loss

    @torch.no_grad()
    def denoise(self, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Denoised ``(n, box, box)`` images (latent mean decoded), on the CPU."""
        self.model.eval()
        out = torch.empty_like(inputs, device="cpu")
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size].to(self.device)
            out[start:start + batch_size] = self.model.decode(self.model.encode(x)[0]).cpu()
        return out

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epochs_done = int(state["epochs_done"])
