"""Flow-matching velocity objective with σ drawn the way ComfyUI samples FLUX.2 [klein] Base.

Convention (ComfyUI's CONST / ModelSamplingFlux for Flux2):
    x_σ = (1 − σ)·x0 + σ·noise,   target v = noise − x0,   denoised = x_σ − σ·v  (= x0 for the exact target)
and the model is called with timestep(σ) = σ.

σ sampling: t is drawn uniform in (0, 1) (default) or logit-normal (t = sigmoid(N(0, 1))) and mapped through
Flux2's resolution-dependent shift, the same function and μ that ComfyUI's `Flux2Scheduler` uses:
    σ = flux_time_shift(μ, 1, t) = e^μ / (e^μ + (1/t − 1)),   μ = compute_empirical_mu(h·w tokens, 50 steps).
With uniform t this is exactly the σ distribution visited by a 50-step Flux2Scheduler run at that resolution
(the scheduler puts its σ at t = linspace(1, 0, steps + 1)). See docs/training-core.md.

"flux2_shift" follows musubi-tuner's `--timestep_sampling flux2_shift`: t = sigmoid(N(0, 1)) and
σ = flux_time_shift(μ, 1, t) with μ linear in the h·w image tokens (0.5 at 256, 1.15 at 4096), so a LoRA
trained there and here sees the same σ distribution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULE_STEPS = 50  # Klein Base samples with ~50 steps; μ depends on it below 4300 image tokens
T_EPS = 1e-5  # keep t inside (0, 1): σ = 0 or 1 exactly teaches nothing and 1/t overflows


def compute_empirical_mu(image_seq_len: int, num_steps: int = SCHEDULE_STEPS) -> float:
    """Port of ComfyUI's comfy_extras.nodes_flux.compute_empirical_mu (FLUX.2's resolution-dependent shift)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def flux_time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """σ(t) = e^μ / (e^μ + (1/t − 1)^sigma), as comfy.model_sampling.flux_time_shift (elementwise on tensors)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux2_shift_mu(image_seq_len: int) -> float:
    """μ of musubi-tuner's flux2_shift: the line through (256 tokens, 0.5) and (4096 tokens, 1.15)."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return 0.5 + slope * (image_seq_len - 256)


def sample_t(batch: int, generator: torch.Generator, mode: str = "uniform") -> Tensor:
    """Unshifted times t [batch] in (0, 1), drawn on the CPU from `generator` (device independent)."""
    if mode == "uniform":
        t = torch.rand(batch, generator=generator, dtype=torch.float64)
    elif mode in ("logit_normal", "flux2_shift"):
        t = torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"timestep_sampling={mode!r}: use 'uniform', 'logit_normal' or 'flux2_shift'.")
    return t.clamp(T_EPS, 1 - T_EPS)


def shifted_sigmas(t: Tensor, image_seq_len: int) -> Tensor:
    """σ = flux_time_shift(μ(image_seq_len, 50), 1, t) for unshifted times t, as float32."""
    return flux_time_shift(compute_empirical_mu(image_seq_len, SCHEDULE_STEPS), 1.0, t).to(torch.float32)


def sample_sigmas(batch: int, image_seq_len: int, generator: torch.Generator, mode: str = "uniform") -> Tensor:
    """Training σ [batch] (float32, CPU) for latents of `image_seq_len` = h·w tokens."""
    t = sample_t(batch, generator, mode)
    if mode == "flux2_shift":
        return flux_time_shift(flux2_shift_mu(image_seq_len), 1.0, t).to(torch.float32)
    return shifted_sigmas(t, image_seq_len)


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·noise; sigma [b] broadcast over [b, c, h, w]."""
    s = sigma.to(x0).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = noise − x0, what the model predicts (ComfyUI: denoised = x_σ − σ·v)."""
    return noise - x0


def flow_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element, computed in fp32 whatever the compute dtype."""
    return (prediction.float() - target.float()).square().mean()
