"""diffusers + PEFT as the reference tool: a tiny Flux2 transformer shaped like a tiny Klein, LoRA files written by
`Flux2KleinPipeline.save_lora_weights`, files loaded by diffusers' own Flux2 LoRA loading, the transformer's
weights under FLUX.2 checkpoint names (for ComfyUI) and its prediction fed as `Flux2KleinPipeline` feeds it.

`DIFFUSERS_TO_KLEIN` is written out here from diffusers' Flux2 module layout (not taken from the pack's reader),
so a test that maps diffusers' weights onto Klein names checks the pack's mapping independently.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import Tensor, nn

# diffusers module (relative to the transformer) -> (Klein module, which third of a fused qkv or None). Written out
# here on purpose rather than imported from lora_formats: the files these tests make are an independent reading of
# diffusers' names, so a wrong entry in the pack's own table cannot make its reader agree with itself.
_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
PEFT_TARGETS = (
    r".*(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out|linear_in|linear_out|to_qkv_mlp_proj"
    r"|single_transformer_blocks\.\d+\.attn\.to_out|x_embedder|context_embedder|proj_out)$"
)


def klein_place(name: str, hidden: int) -> tuple[str, slice | None]:
    """Where a diffusers module's weight sits in Klein: (module, row slice of a fused qkv or None)."""
    if name in _GLOBAL:
        return _GLOBAL[name], None
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", name)
    if m is None:
        raise KeyError(name)
    kind, index, rest = m.groups()
    if kind == "single_transformer_blocks":
        return f"single_blocks.{index}.{_SINGLE[rest]}", None
    module, third = _BLOCK[rest]
    rows = None if third is None else slice(third * hidden, (third + 1) * hidden)
    return f"double_blocks.{index}.{module}", rows


def tiny_transformer(hidden: int, double_blocks: int, single_blocks: int, context_dim: int, seed: int = 0):
    """diffusers' Flux2 transformer with a tiny Klein's dimensions (heads of 128, MLP ratio 3, no guidance)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=128,
        num_attention_heads=hidden // 128,
        joint_attention_dim=context_dim,
        guidance_embeds=False,
    ).eval()


def peft_lora_file(transformer: nn.Module, path: Path, seed: int = 3, **config) -> None:
    """A LoRA made by PEFT on `transformer` (random A and B) and saved by `Flux2KleinPipeline.save_lora_weights`
    with its LoraConfig as the `lora_adapter_metadata` header."""
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(transformer)
    cfg = LoraConfig(target_modules=PEFT_TARGETS, **config)
    model.add_adapter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if "lora_A" in name else 0.05))
    Flux2KleinPipeline.save_lora_weights(
        str(path.parent),
        transformer_lora_layers=get_peft_model_state_dict(model),
        weight_name=path.name,
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )


def with_lora(transformer: nn.Module, path: Path) -> nn.Module:
    """A copy of `transformer` with the LoRA file loaded the way `Flux2KleinPipeline.load_lora_weights` loads it
    (its `lora_state_dict` conversion and header, then the transformer's PEFT loading), applied at forward time."""
    from diffusers import Flux2KleinPipeline

    model = copy.deepcopy(transformer)
    state_dict, metadata = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    Flux2KleinPipeline.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)
    return model


def diffusers_deltas(transformer: nn.Module, path: Path) -> tuple[dict[str, Tensor], int]:
    """Load a LoRA file as `with_lora` does, merge it with PEFT, and return each module's weight change by
    diffusers name, with the number of LoRA layers diffusers created."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = {n: m.weight.detach().clone() for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    model = with_lora(transformer, path)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    out = {}
    with torch.no_grad():
        for name, layer in layers:
            layer.merge()
            out[name] = layer.get_base_layer().weight.detach() - before[name]
    return out, len(layers)


def deltas_on_klein(deltas: dict[str, Tensor], hidden: int) -> dict[str, Tensor]:
    """diffusers' per-module weight changes assembled onto Klein's (fused) modules."""
    out: dict[str, Tensor] = {}
    for name, delta in deltas.items():
        module, rows = klein_place(name, hidden)
        if name == "norm_out.linear":  # diffusers emits (scale, shift), Klein's final adaLN (shift, scale)
            delta = torch.cat(delta.chunk(2, dim=0)[::-1], dim=0)
        if rows is None:
            out[module] = delta
            continue
        full = out.setdefault(module, torch.zeros(3 * hidden, delta.shape[1]))
        full[rows] = delta
    return out


# diffusers' RMSNorm weights (relative to a block) -> Klein's, which checkpoints name `.scale`
_BLOCK_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def randomize_(transformer: nn.Module, seed: int) -> nn.Module:
    """Seeded weights that keep a tiny Flux2's activations O(1): Linears ~ N(0, 1/fan_in) (residual outputs
    scaled down by the depth, modulations by 10, as in a trained DiT), RMSNorm weights 1 + N(0, 0.1²) so a
    swapped query/key norm would show in the output."""
    gen = torch.Generator().manual_seed(seed)
    depth = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                continue
            std = p.shape[1] ** -0.5
            if name.endswith(("to_out.0.weight", "to_add_out.weight", "linear_out.weight", "attn.to_out.weight")):
                std /= depth**0.5
            if "modulation" in name or name.startswith("norm_out"):
                std *= 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return transformer


def klein_checkpoint(transformer: nn.Module) -> dict[str, Tensor]:
    """A diffusers Flux2 transformer's weights under FLUX.2 checkpoint names (what ComfyUI's UNETLoader reads):
    q/k/v stacked into the fused qkv, norm_out's (scale, shift) halves swapped to (shift, scale), RMSNorm weights
    as `.scale`. ComfyUI 0.29 has no converter for a whole Flux2 transformer (`convert_diffusers_mmdit` needs
    FLUX.1's biases, and `flux_to_diffusers` has no names for Flux2's time embedder and global modulations), so
    this uses the independent map above."""
    hidden = transformer.x_embedder.weight.shape[0]
    linears = {n: m.weight.detach() for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    out = deltas_on_klein(linears, hidden)
    out = {f"{name}.weight": w.clone().contiguous() for name, w in out.items()}
    used = len(linears)
    for key, value in transformer.state_dict().items():
        m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(attn\.norm_\w+)\.weight", key)
        if m is None:
            continue
        kind, index, rest = m.groups()
        used += 1
        if kind == "single_transformer_blocks":
            out[f"single_blocks.{index}.{_SINGLE_NORMS[rest]}.scale"] = value.clone()
        else:
            out[f"double_blocks.{index}.{_BLOCK_NORMS[rest]}.scale"] = value.clone()
    if used != len(transformer.state_dict()):
        raise KeyError("a diffusers weight has no Klein name in this map")
    return out


def diffusers_predict(transformer: nn.Module, x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
    """The transformer's velocity for latents x [b, 128, h, w] at noise level sigma [b] and text features
    context [b, L, D], fed as `Flux2KleinPipeline.__call__` feeds it: latents packed and text/latent position ids
    made by the pipeline's own helpers, `timestep = t / 1000` where the scheduler's t is sigma · 1000, no
    guidance; the output unpacked back to [b, 128, h, w]."""
    from diffusers import Flux2KleinPipeline as P

    ids = P._prepare_latent_ids(x)
    with torch.no_grad():
        out = transformer(
            hidden_states=P._pack_latents(x),
            timestep=sigma,
            guidance=None,
            encoder_hidden_states=context,
            txt_ids=P._prepare_text_ids(context),
            img_ids=ids,
            return_dict=False,
        )[0]
    return P._unpack_latents_with_ids(out, ids, x.shape[2], x.shape[3]).float()
