"""Preservation: prompts without the trigger keep the base model's prediction while the LoRA learns the concept.

The course's stop rule "the concept appears without the trigger" names a failure the trainer can work against
while it trains. ai-toolkit's Differential Output Preservation does it this way, and so do we: on a share of the
steps, the item's caption with its trigger removed (or a class word in its place) goes through the same noisy
latent x_σ and the same σ twice,

    target = v_base(x_σ, σ, caption without trigger)      adapters off, under no_grad: no second model copy
    loss_p = ‖v_lora(x_σ, σ, caption without trigger) − target‖²   (mean over elements, fp32)

and `preservation_weight · loss_p` is added to the step's loss. Where the LoRA leaves trigger-free prompts as the
base model had them, loss_p is exactly 0 and nothing is pulled; where it changed them, the gradient pulls that
change back while the trigger-bearing caption keeps teaching the concept.

PEFT has no such objective (it holds adapters, not training losses), so it is written here; the adapters are
switched off by handing klein_forward no adapters, the same forward the validation previews use for step 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..model.klein import AdapterDeltas, klein_forward
from .objective import flow_loss


def base_prediction(
    model: nn.Module,
    x_t: Tensor,
    sigma: Tensor,
    context: Tensor,
    refs: Sequence[Tensor] | None = None,
    compile_blocks: bool = False,
    compute: str = "bf16",
    fp8_scales: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """v of the model without any adapter [b, 128, h, w], under no_grad (a target, never trained through)."""
    with torch.no_grad():
        return klein_forward(
            model, x_t, sigma, context, refs, None, False, compile_blocks, compute, fp8_scales=fp8_scales
        )


def preservation_loss(
    model: nn.Module,
    x_t: Tensor,
    sigma: Tensor,
    context: Tensor,
    adapters: AdapterDeltas | None,
    refs: Sequence[Tensor] | None = None,
    checkpointing: bool | float = False,
    compile_blocks: bool = False,
    compute: str = "bf16",
    offload_inputs: bool = False,
    fp8_scales: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """MSE between the adapted and the base model's velocity for one trigger-free conditioning.

    x_t [b, 128, h, w] is the noisy latent of the training step, sigma [b] its σ, context [b, L, ctx] the
    trigger-free captions. Exactly 0 with adapters None (the same forward twice) or a LoRA whose B is still 0.
    """
    target = base_prediction(model, x_t, sigma, context, refs, compile_blocks, compute, fp8_scales)
    v = klein_forward(
        model, x_t, sigma, context, refs, adapters, checkpointing, compile_blocks, compute, offload_inputs, fp8_scales
    )
    return flow_loss(v, target)
