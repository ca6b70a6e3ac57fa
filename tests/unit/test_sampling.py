"""Unit tests of the standalone sampler: Flux2 schedule, Euler on velocity, CFG and context padding."""

from __future__ import annotations

import torch
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack, LoraTrainable
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein
from klein_lora_lab.trainer_core.training.data import pad_context
from klein_lora_lab.trainer_core.training.objective import compute_empirical_mu, flux_time_shift
from klein_lora_lab.trainer_core.training.sampling import flux2_sigmas, sample

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)


def test_flux2_sigmas_shape_and_shift() -> None:
    """steps + 1 decreasing σ from 1 to 0, σ_i = shift_μ(1 − i/steps) with μ from (tokens, steps)."""
    sigmas = flux2_sigmas(20, 1024)
    assert sigmas.shape == (21,) and sigmas[0] == 1 and sigmas[-1] == 0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    mu = compute_empirical_mu(1024, 20)
    torch.testing.assert_close(sigmas[10], flux_time_shift(mu, 1.0, torch.tensor(0.5)))


def test_zero_velocity_model_returns_the_noise() -> None:
    """A model whose output layer is zero predicts v = 0, so Euler never moves: the result is σ_0·noise."""
    model = tiny_klein(TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16, zero_final=True))
    noise = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample(model, noise, tiny_conditioning(SPEC, 3)[0], flux2_sigmas(4, 4))
    assert torch.equal(out, noise)


def test_cfg_with_identical_negative_equals_no_cfg() -> None:
    """Real CFG v_neg + cfg·(v_pos − v_neg) is the plain prediction when both conditionings are equal."""
    model = tiny_klein(SPEC)
    noise = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(0))
    ctx = tiny_conditioning(SPEC, 3)[0]
    sigmas = flux2_sigmas(3, 4)
    plain = sample(model, noise, ctx, sigmas)
    torch.testing.assert_close(sample(model, noise, ctx, sigmas, negative_context=ctx, cfg=4.0), plain)
    other = tiny_conditioning(SPEC, 3, seed=9)[0]
    assert not torch.allclose(sample(model, noise, ctx, sigmas, negative_context=other, cfg=4.0), plain)


def test_context_is_padded_like_comfyui() -> None:
    """sample() left-pads the context to 512 tokens itself; a pre-padded context gives the same latent."""
    model = tiny_klein(SPEC)
    noise = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(0))
    ctx = tiny_conditioning(SPEC, 3)
    padded = pad_context(ctx)
    assert padded.shape == (1, 512, 16) and torch.equal(padded[:, -3:], ctx) and padded[:, :-3].abs().sum() == 0
    sigmas = flux2_sigmas(2, 4)
    assert torch.equal(sample(model, noise, ctx[0], sigmas), sample(model, noise, padded, sigmas))


def test_adapters_and_refs_change_the_result() -> None:
    """An adapter stack and reference latents reach the model during sampling."""
    model = tiny_klein(SPEC)
    noise = torch.randn(1, 128, 2, 2, generator=torch.Generator().manual_seed(0))
    ctx = tiny_conditioning(SPEC, 3)[0]
    sigmas = flux2_sigmas(2, 4)
    base = sample(model, noise, ctx, sigmas)
    lora = LoraTrainable(resolve_targets(model, "attention"), 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in lora.up.values():
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    stack = AdapterStack()
    stack.set_lora("a", lora.weights(), 1.0)
    assert not torch.allclose(sample(model, noise, ctx, sigmas, adapters=stack), base)
    ref = torch.randn(128, 2, 2, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(sample(model, noise, ctx, sigmas, refs=[ref]), base)
