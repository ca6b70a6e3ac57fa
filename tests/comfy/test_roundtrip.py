"""The round trip through ComfyUI: a LoRA trained by trainer_core, saved by lora_file and loaded with core's
stock LoRA loader gives ComfyUI the same predictions as our training-time forward, ComfyUI's own sampling
convention agrees with our objective, and a LoRA trained on one latent makes core's sampler reproduce it.

Figures (parity error, relative error / PSNR with and without the LoRA, steps, CPU seconds) are printed;
run with `-s` to see them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.tiny import (
    TinyKlein,
    TinySpec,
    tiny_conditioning,
    tiny_klein,
    tiny_klein_state_dict,
    to_checkpoint_keys,
)
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem, pad_context
from klein_lora_lab.trainer_core.training.objective import add_noise, compute_empirical_mu, velocity_target
from klein_lora_lab.trainer_core.training.sampling import flux2_sigmas, sample
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import TrainResult, train

PARITY_SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=2, context_dim=32)


def _comfy_model(spec: TinySpec, seed: int):
    """The tiny Klein as ComfyUI loads a diffusion model file (detected as flux2), in fp32 on the CPU."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(
        tiny_klein_state_dict(spec, seed), model_options={"dtype": torch.float32}
    )
    assert type(patcher.model).__name__ == "Flux2"
    return patcher


def _load_lora_in_comfy(patcher, path: Path, caplog: pytest.LogCaptureFixture):
    """core's LoraLoader path (load_torch_file + load_lora_for_models); asserts zero unmatched keys."""
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, 1.0, 0.0)
    unmatched = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert unmatched == []
    comfy.model_management.load_models_gpu([patched])
    return patched


def _train(tmp: Path, spec: TinySpec, seed: int, items: list[TrainItem], settings: TrainSettings) -> TrainResult:
    run = RunFolder.create(tmp, settings, {"trigger": "TOK"})
    return train(tiny_klein(spec, seed), items, settings, run)


def test_parity_with_comfyui_lora_loader(comfy_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a few steps on every Linear of the tiny Klein (global layers included), the saved file loads in
    core's loader with zero unmatched keys, patches every module, and ComfyUI's apply_model (denoised) and
    diffusion model (velocity) equal our training-time forward at the same x_σ, σ and conditioning, without
    and with a reference latent (image-to-image)."""
    g = torch.Generator().manual_seed(0)
    items = [
        TrainItem(
            torch.randn(128, 3, 4, generator=g), torch.randn(5, 32, generator=g), (torch.randn(128, 2, 3, generator=g),)
        )
        for _ in range(2)
    ]
    settings = TrainSettings(rank=4, alpha=8, learning_rate=5e-3, steps=4, targets="regex:.*", save_dtype="fp32")
    result = _train(tmp_path / "run", PARITY_SPEC, 3, items, settings)
    weights, meta = load_lora(result.last_checkpoint)
    assert meta["klein_lab.step"] == "4"
    assert all(w.up.abs().max() > 0 for w in weights.values())  # the LoRA really moved every module

    import comfy.sd
    import comfy.utils

    base = _comfy_model(PARITY_SPEC, 3)
    # The warning capture works: a key ComfyUI cannot place is reported (so "zero unmatched" means something).
    bogus = {
        **comfy.utils.load_torch_file(str(result.last_checkpoint)),
        "diffusion_model.nowhere.lora_A.weight": torch.zeros(1, 1),
    }
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(base, None, bogus, 1.0, 0.0)
    assert any("lora key not loaded" in r.getMessage() and "nowhere" in r.getMessage() for r in caplog.records)

    patched = _load_lora_in_comfy(base, result.last_checkpoint, caplog)
    assert len(patched.patches) == len(weights)

    ours_model = tiny_klein(PARITY_SPEC, 3)
    x0, noise = items[0].latent[None], torch.randn(1, 128, 3, 4, generator=g)
    sigma = torch.tensor([0.7])
    x_t = add_noise(x0, noise, sigma)
    ctx = pad_context(items[0].context[None])
    worst = 0.0
    for refs in (None, [items[0].refs[0][None]]):
        extra = {} if refs is None else {"ref_latents": refs}
        with torch.no_grad():
            ours_v = klein_forward(ours_model, x_t, sigma, ctx, refs, result.lora)
            comfy_v = patched.model.diffusion_model(x_t, sigma, context=ctx, **extra)
            comfy_denoised = patched.model.apply_model(x_t, sigma, c_crossattn=ctx, **extra)
            base_v = klein_forward(ours_model, x_t, sigma, ctx, refs)
        assert (ours_v - base_v).abs().max() > 1e-3  # the comparison is not between two base models
        torch.testing.assert_close(comfy_v, ours_v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(comfy_denoised, x_t - sigma * ours_v, rtol=1e-4, atol=1e-5)
        worst = max(
            worst, (comfy_v - ours_v).abs().max().item(), (comfy_denoised - (x_t - sigma * ours_v)).abs().max().item()
        )
    print(f"\n[parity] {len(weights)} modules, max |ComfyUI − ours| = {worst:.3g} (v and denoised, ± ref)")


def test_convention_matches_comfyui_sampling(comfy_root: Path) -> None:
    """ComfyUI's calculate_denoised(σ, our target, x_σ) is the clean latent, its noise_scaling is our x_σ, and
    our Flux2 schedule / μ equal core's Flux2Scheduler and compute_empirical_mu."""
    from comfy_extras import nodes_flux

    patcher = _comfy_model(PARITY_SPEC, 0)
    ms = patcher.model.model_sampling
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 128, 4, 4, generator=g), torch.randn(2, 128, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 0.95])
    x_t = add_noise(x0, noise, sigma)
    torch.testing.assert_close(ms.noise_scaling(sigma, noise, x0), x_t)
    torch.testing.assert_close(ms.calculate_denoised(sigma, velocity_target(x0, noise), x_t), x0, rtol=0, atol=1e-6)
    assert torch.equal(ms.timestep(sigma), sigma)
    # ComfyUI's fixed Flux2 shift (KSampler's simple/normal schedulers) is Flux2Scheduler's μ at 1024², 50 steps.
    assert abs(ms.shift - compute_empirical_mu(4096, 50)) < 0.01
    for tokens, steps in ((64, 20), (1024, 50), (4096, 50), (6000, 30)):
        assert compute_empirical_mu(tokens, steps) == nodes_flux.compute_empirical_mu(tokens, steps)
    for width, height, steps in ((1024, 1024, 50), (512, 768, 20), (128, 128, 8)):
        (comfy_sigmas,) = nodes_flux.Flux2Scheduler.execute(steps, width, height)
        torch.testing.assert_close(flux2_sigmas(steps, round(width * height / 256)), comfy_sigmas.float())


def test_sampler_matches_comfyui_euler(comfy_root: Path) -> None:
    """Our Euler sampler equals core's sample_custom (euler, Flux2 sigmas, cfg 1 and real CFG), with the
    context padded by ComfyUI itself, and with a reference latent passed as ComfyUI's reference_latents; and
    core's KSampler (euler, 'simple') given the same seeded noise and its own sigmas."""
    import comfy.sample
    import comfy.samplers

    patcher = _comfy_model(PARITY_SPEC, 5)
    model = tiny_klein(PARITY_SPEC, 5)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 128, 4, 4, generator=g)
    ctx, neg = tiny_conditioning(PARITY_SPEC, 6, seed=1), tiny_conditioning(PARITY_SPEC, 3, seed=2)
    ref = torch.randn(1, 128, 2, 2, generator=g)
    sigmas = flux2_sigmas(6, 16)
    for cfg, refs in ((1.0, None), (3.0, None), (1.0, [ref])):
        extra = {} if refs is None else {"reference_latents": refs}
        comfy_out = comfy.sample.sample_custom(
            patcher,
            noise,
            cfg,
            comfy.samplers.sampler_object("euler"),
            sigmas,
            [[ctx, dict(extra)]],
            [[neg, dict(extra)]],
            torch.zeros_like(noise),
            disable_pbar=True,
        )
        ours = sample(model, noise, ctx, sigmas, negative_context=neg if cfg != 1.0 else None, cfg=cfg, refs=refs)
        torch.testing.assert_close(ours, comfy_out, rtol=1e-4, atol=1e-4)
    # Core's KSampler node path (euler, 'simple' scheduler, seeded noise) with its own sigmas.
    import nodes

    latent = {"samples": torch.zeros(1, 128, 4, 4)}
    (ksampler,) = nodes.common_ksampler(patcher, 7, 6, 1.0, "euler", "simple", [[ctx, {}]], [[neg, {}]], latent)
    simple = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 6)
    ours = sample(model, comfy.sample.prepare_noise(latent["samples"], 7), ctx, simple)
    torch.testing.assert_close(ours, ksampler["samples"], rtol=1e-4, atol=1e-4)


# The learning check. A random tiny Klein is no sane base: with a random output layer it predicts noise
# (TrainLoraNode's anchor starts at rel. error 1.71) and with a zero one (TinySpec(zero_final=True)) it predicts
# v = 0, so a LoRA must first learn to pass 128 latent channels through an ill-conditioned random img_in. The
# base here starts like a trained DiT's identity path instead: img_in and final_layer.linear are an orthogonal
# pair (Q, Qᵀ), so the untrained base predicts v ≈ x_σ (denoised ≈ (1 − σ)·x_σ: "latents are centred at 0").
# The latent is a smooth one (a colour per channel plus row and column gradients, like a simple image), because a
# random tiny Klein has no trained positional features to memorise per-pixel noise with.
LEARN_SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=32)
LEARN_SETTINGS = dict(
    rank=16,
    alpha=16,
    learning_rate=3e-3,
    steps=250,
    targets="regex:.*",
    timestep_sampling="logit_normal",
    gradient_checkpointing=False,
    checkpoint_every=0,
    save_dtype="fp32",
)
LEARN_MAX_REL = 0.4


def _passthrough_base(spec: TinySpec, seed: int) -> TinyKlein:
    """tiny_klein(spec, seed) with img_in = Q and final_layer.linear = Qᵀ (Q orthonormal [hidden, 128])."""
    model = tiny_klein(spec, seed)
    q, _ = torch.linalg.qr(torch.randn(spec.hidden, 128, generator=torch.Generator().manual_seed(seed + 1)))
    with torch.no_grad():
        model.img_in.weight.copy_(q)
        model.final_layer.linear.weight.copy_(q.t())
    return model


def _smooth_latent(size: int, generator: torch.Generator) -> torch.Tensor:
    """[128, size, size]: a random colour per channel plus random row and column gradients."""
    colour, rows, cols = torch.randn(3, 128, 1, 1, generator=generator)
    ramp = torch.linspace(-1, 1, size)
    return colour + rows * ramp[:, None] + cols * ramp[None, :]


def _latent_metrics(out: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Relative error ||out − target|| / ||target|| and latent PSNR (peak = the target's value range)."""
    rel = ((out - target).norm() / target.norm()).item()
    mse = (out - target).square().mean().item()
    psnr = 10 * math.log10((target.max() - target.min()).item() ** 2 / mse)
    return rel, psnr


def test_lora_moves_comfyui_sampler_to_the_trained_latent(
    comfy_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A LoRA trained on one latent with one conditioning makes core's KSampler (euler, 'simple', cfg 1, fixed
    seed) and SamplerCustom with Flux2Scheduler sigmas land much closer to that latent than the base does."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    import nodes

    target = _smooth_latent(8, torch.Generator().manual_seed(123))
    ctx = tiny_conditioning(LEARN_SPEC, tokens=6, seed=5)
    settings = TrainSettings(**LEARN_SETTINGS)
    run = RunFolder.create(tmp_path / "run", settings, {"trigger": "TOK"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: CPU seconds that mean the same on any machine
    try:
        start, wall = time.process_time(), time.perf_counter()
        result = train(_passthrough_base(LEARN_SPEC, 0), [TrainItem(target, ctx[0])], settings, run)
        cpu_seconds, wall_seconds = time.process_time() - start, time.perf_counter() - wall
    finally:
        torch.set_num_threads(threads)

    state_dict = to_checkpoint_keys(_passthrough_base(LEARN_SPEC, 0).state_dict())
    base = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": torch.float32})
    patched = _load_lora_in_comfy(base, result.last_checkpoint, caplog)
    positive, negative = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    latent = {"samples": torch.zeros(1, 128, 8, 8)}
    noise = comfy.sample.prepare_noise(latent["samples"], 42)
    sigmas = flux2_sigmas(20, 64)
    figures = {}
    for name, model in (("base", base), ("lora", patched)):
        (ksampler,) = nodes.common_ksampler(model, 42, 20, 1.0, "euler", "simple", positive, negative, latent)
        custom = comfy.sample.sample_custom(
            model,
            noise,
            1.0,
            comfy.samplers.sampler_object("euler"),
            sigmas,
            positive,
            negative,
            latent["samples"],
            disable_pbar=True,
            seed=42,
        )
        figures[name] = (_latent_metrics(ksampler["samples"][0], target), _latent_metrics(custom[0], target))
    (k_base, c_base), (k_lora, c_lora) = figures["base"], figures["lora"]
    print(
        f"\n[learning] {settings.steps} steps in {cpu_seconds:.1f} s CPU, {wall_seconds:.1f} s wall, 1 thread "
        f"(rank {settings.rank}, lr "
        f"{settings.learning_rate:g}, latent 128x8x8)\n  KSampler euler/simple: rel {k_base[0]:.3f} -> "
        f"{k_lora[0]:.3f}, PSNR {k_base[1]:.1f} -> {k_lora[1]:.1f} dB\n  SamplerCustom euler/Flux2Scheduler: rel "
        f"{c_base[0]:.3f} -> {c_lora[0]:.3f}, PSNR {c_base[1]:.1f} -> {c_lora[1]:.1f} dB"
    )
    for before, after in ((k_base, k_lora), (c_base, c_lora)):
        assert after[0] < LEARN_MAX_REL < before[0]
        assert after[1] > before[1] + 6.0  # at least 6 dB closer
    # Our sampler with the file's LoRA as a forward-time adapter lands where ComfyUI's does.
    stack = AdapterStack()
    stack.set_lora("trained", load_lora(result.last_checkpoint)[0], 1.0)
    ours = sample(_passthrough_base(LEARN_SPEC, 0), noise, ctx, sigmas, adapters=stack)
    assert abs(_latent_metrics(ours[0], target)[0] - c_lora[0]) < 1e-3
