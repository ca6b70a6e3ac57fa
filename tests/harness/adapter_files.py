"""Adapter files made by the tools' own code (LyCORIS, PEFT through diffusers) for a Klein of a given shape.

LyCORIS wraps a Klein-shaped module with ComfyUI's module names, so its keys are `lycoris_double_blocks_0_...`;
the same tensors are also written under the key rules of ai-toolkit (`diffusion_model.<dotted module>`) and
musubi-tuner / kohya (`lora_unet_<underscored module>`). The wrapped module itself is the tool's reference:
its forward is LyCORIS' own inference.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# (label, LyCORIS algo, create_lycoris keyword arguments)
LYCORIS_KINDS: dict[str, tuple[str, dict]] = {
    "LoKr": ("lokr", {"factor": 8}),
    "LoKr full matrices": ("lokr", {"factor": 8, "full_matrix": True}),
    "LoHa": ("loha", {}),
    "DoRA (per output row)": ("lora", {"dora_wd": True}),
    "DoRA (per input column)": ("lora", {"dora_wd": True, "wd_on_output": False}),
    "DoRA LoKr": ("lokr", {"factor": 8, "dora_wd": True}),
}
KEY_STYLES = ("lycoris", "ai-toolkit", "musubi")


@dataclass
class ToolFile:
    """A state dict made by a tool, and the module wrapped by that tool (its forward is the tool's output)."""

    state_dict: dict[str, Tensor]
    wrapped: nn.Module
    base: nn.Module  # an untouched copy of the base weights


def lycoris_file(model: nn.Module, kind: str, seed: int = 1, scale: float = 0.1) -> ToolFile:
    """LyCORIS' network of `kind` over `model` (a Klein-shaped module with ComfyUI names), with random weights
    (LyCORIS starts with a zero factor, which would make every file a no-op)."""
    from lycoris import create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    algo, kwargs = LYCORIS_KINDS[kind]
    base = copy.deepcopy(model)
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kwargs)
    network.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "dora_scale" in name:  # a magnitude near the weight's own norm, changed a little
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    sd = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    return ToolFile(sd, model, base)


def restyle(state_dict: dict[str, Tensor], model: nn.Module, style: str) -> dict[str, Tensor]:
    """The `lycoris_*` keys of a file written under another tool's key rule (same tensors)."""
    if style == "lycoris":
        return dict(state_dict)
    dotted = {name.replace(".", "_"): name for name, _ in model.named_modules() if name}
    out = {}
    for key, value in state_dict.items():
        module, _, suffix = key.removeprefix("lycoris_").partition(".")
        name = dotted[module]
        prefix = f"diffusion_model.{name}" if style == "ai-toolkit" else "lora_unet_" + name.replace(".", "_")
        out[f"{prefix}.{suffix}"] = value
    return out


def effective_weights(wrapped: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The weight each wrapped Linear acts with, read through its own (the tool's) forward: W = f(I)ᵀ.

    Klein's Linears have no bias, so feeding the identity returns exactly the weight the tool applies."""
    out = {}
    with torch.no_grad():
        for name in names:
            module = wrapped.get_submodule(name)
            eye = torch.eye(module.in_features, dtype=module.weight.dtype)
            out[name] = module(eye).t().contiguous()
    return out


def lycoris_module_names(state_dict: dict[str, Tensor], model: nn.Module) -> list[str]:
    """Dotted names of the modules a `lycoris_*` file adapts."""
    dotted = {name.replace(".", "_"): name for name, _ in model.named_modules() if name}
    return sorted({dotted[k.removeprefix("lycoris_").partition(".")[0]] for k in state_dict})
