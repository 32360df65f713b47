"""DRVAE: shapes, loss, and that training really denoises (against the clean images)."""

from __future__ import annotations

import torch

from cryo_drvae.config import TrainConfig
from cryo_drvae.model import DRVAE, drvae_loss
from cryo_drvae.store import RowStore
from cryo_drvae.train import Denoiser, TrainingPairs


def test_shapes_and_loss_terms():
    model = DRVAE(24, latent_dim=4, channels=8)
    images = torch.randn(5, 24, 24)
    recon, mean, logvar = model(images)
    assert recon.shape == images.shape and mean.shape == (5, 4) and logvar.shape == (5, 4)
    total, recon_term, kl = drvae_loss(recon, images, mean, logvar, kl_weight=1.0)
    assert total >= recon_term and kl >= 0


def test_training_denoises_towards_the_clean_images():
    generator = torch.Generator().manual_seed(0)
    grid = torch.arange(16.0) - 8
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    shapes = torch.stack([torch.exp(-((xx - 3) ** 2 + yy ** 2) / 6), torch.exp(-(xx ** 2 + (yy + 3) ** 2) / 6),
                          ((xx ** 2 + yy ** 2) < 20).float() * 0.8])
    clean = shapes[torch.arange(384) % 3]
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=generator)
    denoiser = Denoiser(16, TrainConfig(latent_dim=4, channels=8, batch_size=32, learning_rate=3e-3),
                        torch.device("cpu"), seed=0)
    denoiser.train(TrainingPairs(RowStore.wrap(noisy)), epochs=15)
    denoised = denoiser.denoise(RowStore.wrap(noisy))
    noisy_error = ((noisy - clean) ** 2).mean()
    denoised_error = ((denoised - clean) ** 2).mean()
    assert denoised_error < noisy_error / 3


def test_checkpoint_state_round_trip():
    cfg = TrainConfig(latent_dim=4, channels=8)
    first = Denoiser(16, cfg, torch.device("cpu"), seed=1)
    first.train(TrainingPairs(RowStore.wrap(torch.randn(64, 16, 16))), epochs=1)
    second = Denoiser(16, cfg, torch.device("cpu"), seed=2)
    second.load_state_dict(first.state_dict())
    probe = torch.randn(4, 16, 16)
    assert torch.equal(first.denoise(RowStore.wrap(probe)), second.denoise(RowStore.wrap(probe)))
    assert second.epochs_done == 1
