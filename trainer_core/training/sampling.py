"""Sampling without ComfyUI, for validation previews and tests: Flux2's schedule and Euler on the velocity.

`sample` follows ComfyUI's path for an empty latent: x = σ_0·noise, then for each step the model's velocity v
(real CFG when a negative conditioning is given: v = v_neg + cfg·(v_pos − v_neg), the same as ComfyUI's CFG on
denoised outputs since denoised = x − σ·v is affine in v), and the Euler update x ← x + (σ_{i+1} − σ_i)·v.
Contexts are left-padded to 512 tokens as ComfyUI's Flux2.extra_conds does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import check_number
from ..model.klein import AdapterDeltas, klein_forward
from .data import pad_context
from .objective import compute_empirical_mu, flux_time_shift

CFG_MIN, CFG_MAX = 0.0, 100.0  # real CFG of Klein Base is ~4; the widgets allow up to 30


def flux2_sigmas(steps: int, image_seq_len: int) -> Tensor:
    """Port of ComfyUI's Flux2Scheduler: σ = shift_μ(linspace(1, 0, steps + 1)), μ from (tokens, steps).

    image_seq_len = latent h·w (= width·height / 256 in pixels). Returns [steps + 1] float32, ending at 0.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1.")
    mu = compute_empirical_mu(image_seq_len, steps)
    return flux_time_shift(mu, 1.0, torch.linspace(1, 0, steps + 1))


def _batched_context(context: Tensor, batch: int) -> Tensor:
    """[L, ctx] or [b, L, ctx] -> [batch, max(L, 512), ctx] (left zero padding)."""
    ctx = context if context.ndim == 3 else context[None]
    ctx = pad_context(ctx)
    return ctx.expand(batch, -1, -1) if ctx.shape[0] == 1 else ctx


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: Tensor,
    context: Tensor,
    sigmas: Tensor,
    negative_context: Tensor | None = None,
    cfg: float = 1.0,
    adapters: AdapterDeltas | None = None,
    refs: Sequence[Tensor] | None = None,
) -> Tensor:
    """Euler sampling from `noise` [b, 128, h, w] along `sigmas` (e.g. flux2_sigmas); returns the latent."""
    check_number(cfg, "cfg", CFG_MIN, CFG_MAX)  # NaN would give black images with no word
    b = noise.shape[0]
    ctx = _batched_context(context, b).to(noise)
    neg = None if negative_context is None else _batched_context(negative_context, b).to(noise)
    ref_list = [r if r.ndim == 4 else r[None].expand(b, -1, -1, -1) for r in refs or ()]
    sigmas = sigmas.to(torch.float32)
    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        s = sigmas[i].expand(b).to(noise.device)
        v = klein_forward(model, x, s, ctx, ref_list or None, adapters)
        if neg is not None:
            v_neg = klein_forward(model, x, s, neg, ref_list or None, adapters)
            v = v_neg + cfg * (v - v_neg)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x) * v
    return x
