"""DRVAE: shapes, loss, and that training really denoises (against the clean images)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.nn import functional as F

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


def test_loss_adds_the_weighted_gaussian_kl_to_the_prior():
    """The KL term, checked against torch.distributions (not a copy of the formula), and in the total."""
    gen = torch.Generator().manual_seed(0)
    recon, target = torch.randn(6, 8, 8, generator=gen), torch.randn(6, 8, 8, generator=gen)
    mean, logvar = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    posterior = Normal(mean, torch.exp(0.5 * logvar))
    expected_kl = kl_divergence(posterior, Normal(torch.zeros(3), torch.ones(3))).sum(1).mean()
    expected_recon = F.mse_loss(recon, target)
    for weight in (0.0, 1.0, 64.0):
        total, recon_term, kl = drvae_loss(recon, target, mean, logvar, kl_weight=weight)
        assert kl == pytest.approx(float(expected_kl), rel=1e-5)
        assert recon_term == pytest.approx(float(expected_recon), rel=1e-5)
        assert total == pytest.approx(float(expected_recon + weight * expected_kl / 64), rel=1e-5)
    _, _, at_prior = drvae_loss(recon, target, torch.zeros(6, 3), torch.zeros(6, 3), kl_weight=1.0)
    assert at_prior == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_kl_weight_pulls_the_latent_posterior_towards_the_prior():
    """Trained with a heavy KL weight, the encoder's posteriors sit much closer to N(0, I)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(128, 16, 16, generator=gen) + torch.linspace(-2, 2, 128)[:, None, None]

    def latent_kl(weight: float) -> float:
        denoiser = Denoiser(16, TrainConfig(latent_dim=4, channels=4, batch_size=32, learning_rate=3e-3,
                                            kl_weight=weight), torch.device("cpu"), seed=0)
        denoiser.train(TrainingPairs(RowStore.wrap(images)), epochs=4)
        denoiser.model.eval()
        with torch.no_grad():
            mean, logvar = denoiser.model.encode(images)
        return float(kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1).mean())

    free, pulled = latent_kl(0.0), latent_kl(256.0)
    assert pulled < 0.25 * free, (free, pulled)


@pytest.mark.slow
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
