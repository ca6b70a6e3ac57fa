"""Unit tests of the flow-matching objective and its σ sampling (ComfyUI's Flux2 schedule convention)."""

from __future__ import annotations

import math

import torch
from klein_lora_lab.trainer_core.training.objective import (
    add_noise,
    compute_empirical_mu,
    flow_loss,
    flux_time_shift,
    sample_sigmas,
    velocity_target,
)
from klein_lora_lab.trainer_core.training.sampling import flux2_sigmas


def test_denoised_of_the_target_is_the_clean_latent() -> None:
    """ComfyUI's CONST denoised = x_σ − σ·v returns x0 for our target v = noise − x0 at any σ."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 128, 2, 3, generator=g), torch.randn(3, 128, 2, 3, generator=g)
    sigma = torch.tensor([0.05, 0.5, 0.97])
    x_t = add_noise(x0, noise, sigma)
    denoised = x_t - sigma.view(-1, 1, 1, 1) * velocity_target(x0, noise)
    torch.testing.assert_close(denoised, x0, rtol=0, atol=1e-6)


def test_mu_at_1024_squared_is_klein_default_shift() -> None:
    """At 1024² (4096 tokens) and 50 steps μ ≈ 2.02, the shift ComfyUI's ModelSamplingFlux uses for Flux2."""
    assert abs(compute_empirical_mu(4096, 50) - 2.02) < 0.01
    # Resolution dependence: more tokens, larger shift; above 4300 tokens μ no longer depends on steps.
    assert compute_empirical_mu(256, 50) < compute_empirical_mu(1024, 50) < compute_empirical_mu(4096, 50)
    assert compute_empirical_mu(8192, 20) == compute_empirical_mu(8192, 50)


def test_uniform_sigmas_follow_the_50_step_flux2_schedule() -> None:
    """With uniform t, the fraction of training σ above the i-th σ of a 50-step Flux2Scheduler run is ≈ i/50:
    training visits σ with the density the sampler spends its steps on, at that resolution."""
    tokens = 64 * 64
    sigmas = sample_sigmas(200_000, tokens, torch.Generator().manual_seed(1))
    schedule = flux2_sigmas(50, tokens)
    for i in (5, 10, 25, 40, 45):
        fraction = (sigmas >= schedule[i]).double().mean().item()
        assert abs(fraction - i / 50) < 0.005, (i, fraction)


def test_logit_normal_is_centred_on_the_shifted_midpoint() -> None:
    """logit-normal t has median 0.5, so the median σ is flux_time_shift(μ, 1, 0.5) = e^μ / (e^μ + 1)."""
    tokens = 32 * 32
    sigmas = sample_sigmas(100_000, tokens, torch.Generator().manual_seed(2), mode="logit_normal")
    mu = compute_empirical_mu(tokens, 50)
    assert abs(sigmas.median().item() - math.exp(mu) / (math.exp(mu) + 1)) < 0.005
    assert 0 < sigmas.min() and sigmas.max() < 1


def test_sigma_draws_are_seeded() -> None:
    """The same generator seed gives the same σ (resume exactness depends on it), another seed differs."""
    a = sample_sigmas(8, 256, torch.Generator().manual_seed(3))
    b = sample_sigmas(8, 256, torch.Generator().manual_seed(3))
    c = sample_sigmas(8, 256, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flux_time_shift_endpoints_and_loss_dtype() -> None:
    """σ(1) = 1 and σ(0.5) = e^μ/(e^μ+1); the loss is computed in fp32 even for bf16 predictions."""
    t = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(flux_time_shift(1.0, 1.0, t), torch.tensor([1.0, math.e / (math.e + 1)]))
    pred = torch.ones(2, 4, dtype=torch.bfloat16)
    loss = flow_loss(pred, torch.zeros(2, 4))
    assert loss.dtype == torch.float32 and loss.item() == 1.0
