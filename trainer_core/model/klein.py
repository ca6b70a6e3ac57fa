"""FLUX.2 [klein] forward pass over any module that carries Klein's module names.

The same function runs on ComfyUI's loaded Flux2 diffusion model (real use) and on `TinyKlein` (tests, demo).
It calls the model's own submodules (so ComfyUI's casting, fp8 and offload logic stays in charge of the base
weights) and differs from ComfyUI's `Flux.forward` in three ways that training needs:

* residuals are added out of place, so autograd never sees a tensor that LayerNorm saved being modified
  (ComfyUI's blocks do `img += ...`, which breaks a plain backward);
* every target Linear gets its forward-time adapters added (`adapters.apply(name, x, y)`), no weight is patched;
* each block can run under activation checkpointing.

Math otherwise mirrors `comfy/ldm/flux` for `image_model == "flux2"`: no biases, global modulation, SiLU-gated
MLPs (ratio 3), RoPE over 4 axes of 32 dims (theta 2000; text positions on axis 3; image rows/cols on axes 1/2;
reference images on axis 0 at index 10, 20, ...), patch size 1 on 128 latent channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..lora.adapters import add_lora
from .fp8_compute import fp8_linear

LATENT_CHANNELS = 128
HEAD_DIM = 128
AXES_DIM = (32, 32, 32, 32)
ROPE_THETA = 2000
MLP_RATIO = 3
REF_INDEX_SCALE = 10.0
TIME_EMBED_DIM = 256


class AdapterDeltas(Protocol):
    """What the forward asks of an adapter set: module `name`'s output `y` for input `x`, plus its adapters."""

    def apply(self, name: str, x: Tensor, y: Tensor) -> Tensor: ...


class NoAdapters:
    def apply(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        return y


@dataclass(frozen=True)
class KleinShape:
    """The dimensions of a Klein diffusion model, read from its modules (never assumed)."""

    hidden: int
    heads: int
    double_blocks: int
    single_blocks: int
    context_dim: int

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * MLP_RATIO


def read_shape(model: nn.Module) -> KleinShape:
    """Read a Klein model's dimensions from its weights; raise ValueError naming what is missing."""
    for attr in ("img_in", "txt_in", "double_blocks", "single_blocks", "double_stream_modulation_img"):
        if not hasattr(model, attr):
            raise ValueError(
                f"not a FLUX.2 [klein] diffusion model: it has no '{attr}' module "
                "(load a Klein Base model with UNETLoader / 'Load Diffusion Model')."
            )
    hidden, latent_in = model.img_in.weight.shape
    if latent_in != LATENT_CHANNELS:
        raise ValueError(
            f"not a FLUX.2 model: img_in takes {latent_in} channels, FLUX.2 latents have 128 (FLUX.1 has 64). "
            "Load a FLUX.2 [klein] Base model with 'Load Diffusion Model'."
        )
    return KleinShape(
        hidden=hidden,
        heads=hidden // HEAD_DIM,
        double_blocks=len(model.double_blocks),
        single_blocks=len(model.single_blocks),
        context_dim=model.txt_in.weight.shape[1],
    )


# ----------------------------------------------------------------------------------------------------------
# Positional encoding (RoPE), identical to comfy.ldm.flux.math.rope / _apply_rope1.


def _rope_axis(pos: Tensor, dim: int, theta: int) -> Tensor:
    """pos [b, n] -> rotation matrices [b, n, dim/2, 2, 2] (float32)."""
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device="cpu").to(pos.device)
    omega = (1.0 / (theta**scale)).to(torch.float32)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float32), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2)


def rope_table(ids: Tensor) -> Tensor:
    """ids [b, n, 4] -> pe [b, 1, n, 64, 2, 2]."""
    return torch.cat([_rope_axis(ids[..., i], AXES_DIM[i], ROPE_THETA) for i in range(len(AXES_DIM))], dim=-3)[:, None]


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """x [b, h, n, d] rotated pairwise by pe [b, 1, n, d/2, 2, 2]."""
    x_ = x.to(pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def image_ids(batch: int, height: int, width: int, index: float, device: torch.device) -> Tensor:
    """Token positions of an image latent [b, h*w, 4]: axis 0 = image index, axes 1/2 = row/col."""
    ids = torch.zeros(height, width, 4, device=device, dtype=torch.float32)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(height, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(1, height * width, 4).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device) -> Tensor:
    """Text token positions [b, L, 4]: only axis 3 counts tokens (txt_ids_dims = [3])."""
    ids = torch.zeros(batch, length, 4, device=device, dtype=torch.float32)
    ids[..., 3] = torch.arange(length, device=device, dtype=torch.float32)
    return ids


def timestep_embedding(t: Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t*1000 as in comfy.ldm.flux.layers.timestep_embedding: [cos | sin]."""
    t = 1000.0 * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Blocks. `lin(module, name, x)` is the only way a Linear is called, so adapters see every target.

Linear = Callable[[nn.Module, str, Tensor], Tensor]


# The fp8 weight scales of a run (fp8_compute.block_weight_scales): by the Linear's full name in klein_forward,
# by its name inside the block ({".img_attn.qkv": [n, 1]}) in a block region.
Fp8Scales = Mapping[str, Tensor]


def _call_module(module: nn.Module, x: Tensor, w_scale: Tensor | None = None) -> Tensor:
    """The module's own forward (bf16 compute): called as fp8_linear is, its w_scale unused."""
    return module(x)


def _base_linear(compute: str) -> Callable[[nn.Module, Tensor, Tensor | None], Tensor]:
    """How a frozen base Linear is computed: the module itself (bf16 under autocast) or fp8 (fp8_compute.py)."""
    if compute not in ("bf16", "fp8"):
        raise ValueError(f"compute={compute!r}: use 'bf16' or 'fp8'.")
    return fp8_linear if compute == "fp8" else _call_module


def _make_lin(adapters: AdapterDeltas, compute: str = "bf16", scales: Fp8Scales | None = None) -> Linear:
    """The `lin` the blocks call. With fp8 compute only the block Linears (names starting with 'double_blocks.'
    or 'single_blocks.') use fp8: the embedders and modulation are small and stay bf16."""
    base = _base_linear(compute)
    scales = scales or {}

    def lin(module: nn.Module, name: str, x: Tensor) -> Tensor:
        in_block = name.startswith(("double_blocks.", "single_blocks."))
        y = base(module, x, scales.get(name)) if in_block else module(x)
        return adapters.apply(name, x, y)

    return lin


def _modulation(lin: Linear, module: nn.Module, name: str, vec: Tensor, parts: int) -> list[Tensor]:
    """vec [b, h] -> `parts` tensors [b, 1, h] (shift, scale, gate, ...)."""
    return list(lin(module.lin, f"{name}.lin", F.silu(vec[:, None, :])).chunk(parts, dim=-1))


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [b, n, 3*h*d] -> q, k, v [b, heads, n, d]."""
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
    return q, k, v


def _attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """[b, h, n, d] x3 -> [b, n, h*d] with RoPE on q and k."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


def _gated_mlp(lin: Linear, mlp: nn.Module, name: str, x: Tensor) -> Tensor:
    """Sequential(Linear(h, 6h), SiLU-gate, Linear(3h, h))."""
    a, b = lin(mlp[0], f"{name}.0", x).chunk(2, dim=-1)
    return lin(mlp[2], f"{name}.2", F.silu(a) * b)


def double_block(
    lin: Linear, block: nn.Module, name: str, img: Tensor, txt: Tensor, mods: Sequence[Tensor], pe: Tensor, heads: int
) -> tuple[Tensor, Tensor]:
    """One double-stream block. mods = 6 img + 6 txt modulation tensors [b, 1, h]."""
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = mods[:6]
    t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = mods[6:]
    img_qkv = lin(block.img_attn.qkv, f"{name}.img_attn.qkv", _layer_norm(img) * (1 + i_sc1) + i_sh1)
    txt_qkv = lin(block.txt_attn.qkv, f"{name}.txt_attn.qkv", _layer_norm(txt) * (1 + t_sc1) + t_sh1)
    iq, ik, iv = _heads(img_qkv, heads)
    tq, tk, tv = _heads(txt_qkv, heads)
    iq, ik = block.img_attn.norm.query_norm(iq).to(iv), block.img_attn.norm.key_norm(ik).to(iv)
    tq, tk = block.txt_attn.norm.query_norm(tq).to(tv), block.txt_attn.norm.key_norm(tk).to(tv)
    attn = _attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
    n_txt = txt.shape[1]
    txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]
    img = img + i_g1 * lin(block.img_attn.proj, f"{name}.img_attn.proj", img_attn)
    img = img + i_g2 * _gated_mlp(lin, block.img_mlp, f"{name}.img_mlp", _layer_norm(img) * (1 + i_sc2) + i_sh2)
    txt = txt + t_g1 * lin(block.txt_attn.proj, f"{name}.txt_attn.proj", txt_attn)
    txt = txt + t_g2 * _gated_mlp(lin, block.txt_mlp, f"{name}.txt_mlp", _layer_norm(txt) * (1 + t_sc2) + t_sh2)
    return img, txt


def single_block(
    lin: Linear, block: nn.Module, name: str, x: Tensor, mods: Sequence[Tensor], pe: Tensor, heads: int, hidden: int
) -> Tensor:
    """One single-stream block on the joint [txt | img] sequence. mods = shift, scale, gate."""
    shift, scale, gate = mods
    h1 = lin(block.linear1, f"{name}.linear1", _layer_norm(x) * (1 + scale) + shift)
    qkv, mlp = h1.split([3 * hidden, h1.shape[-1] - 3 * hidden], dim=-1)
    q, k, v = _heads(qkv, heads)
    q, k = block.norm.query_norm(q).to(v), block.norm.key_norm(k).to(v)
    attn = _attention(q, k, v, pe)
    a, b = mlp.chunk(2, dim=-1)
    out = lin(block.linear2, f"{name}.linear2", torch.cat((attn, F.silu(a) * b), dim=2))
    return x + gate * out


def _bind_double(
    lin: Linear, block: nn.Module, name: str, heads: int, fn: Callable = double_block
) -> Callable[..., tuple[Tensor, Tensor]]:
    """A checkpointable closure: every tensor it needs is an argument, so recomputation sees the same inputs."""

    def run(img: Tensor, txt: Tensor, pe: Tensor, *mods: Tensor) -> tuple[Tensor, Tensor]:
        return fn(lin, block, name, img, txt, mods, pe, heads)

    return run


def _bind_single(
    lin: Linear, block: nn.Module, name: str, heads: int, hidden: int, fn: Callable = single_block
) -> Callable[..., Tensor]:
    def run(x: Tensor, pe: Tensor, *mods: Tensor) -> Tensor:
        return fn(lin, block, name, x, mods, pe, heads, hidden)

    return run


def _bind_double_region(
    region: Callable, block: nn.Module, lora: BlockLora, heads: int, compute: str, scales: Fp8Scales
) -> Callable:
    def run(img: Tensor, txt: Tensor, pe: Tensor, *mods: Tensor) -> tuple[Tensor, Tensor]:
        return region(block, img, txt, pe, mods, lora, heads, compute, scales)

    return run


def _bind_single_region(
    region: Callable, block: nn.Module, lora: BlockLora, heads: int, hidden: int, compute: str, scales: Fp8Scales
) -> Callable:
    def run(x: Tensor, pe: Tensor, *mods: Tensor) -> Tensor:
        return region(block, x, pe, mods, lora, heads, hidden, compute, scales)

    return run


# torch.compile'd block functions, made on first use. Compiling fuses the element-wise work around the matmuls
# (norms, modulation, RoPE, gates, LoRA adds): Klein 4B at 1024² on an H200 goes from 0.218 to 0.162 s/step.
#
# Regional compilation: one graph per block *type*, reused by every block of that type. The block's module is
# an argument (its weights are graph inputs) and the adapters reach the graph as a dict keyed by the Linear's
# name *inside* the block ({".img_attn.qkv": (down, up, scale)}), so no block-specific constant is baked in.
# That needs adapters that can hand out their tensors (`fused(name)`: LoraTrainable, AdapterStack); others go
# through the per-block path, where each block compiles once (its module names are constants of its graph),
# hence the raised recompile limit.
#
# dynamic=None (torch's automatic dynamic shapes): the first shape compiles a graph specialised to it; the first
# other shape (another aspect bucket, a short batch at an epoch's end) compiles once more with the changing sizes
# symbolic, and every later shape reuses that graph. Compiled static, each (bucket, batch) pair compiled anew:
# an album of 200 images in 5 buckets spent its first 14 steps (6 minutes on an H200) compiling 9 shapes.
_COMPILED: dict[object, tuple[Callable, Callable]] = {}
_REGIONS: dict[object, tuple[Callable, Callable]] = {}
COMPILE_RECOMPILE_LIMIT = 128


def _backend(compiled: bool | str | Callable) -> object:
    return "inductor" if compiled is True else compiled


def _block_functions(compiled: bool | str | Callable) -> tuple[Callable, Callable]:
    """The block functions, eager or compiled with the given torch.compile backend (True = inductor)."""
    if not compiled:
        return double_block, single_block
    backend = _backend(compiled)
    if backend not in _COMPILED:
        _COMPILED[backend] = (
            torch.compile(double_block, dynamic=None, backend=backend),
            torch.compile(single_block, dynamic=None, backend=backend),
        )
    return _COMPILED[backend]


BlockLora = dict[str, tuple[Tensor, Tensor, float]]


def _dict_lin(lora: BlockLora, compute: str = "bf16", scales: Fp8Scales | None = None) -> Linear:
    base = _base_linear(compute)
    scales = scales or {}

    def lin(module: nn.Module, name: str, x: Tensor) -> Tensor:
        y = base(module, x, scales.get(name))
        entry = lora.get(name)
        return y if entry is None else add_lora(x, y, *entry)

    return lin


def _double_region(
    block: nn.Module,
    img: Tensor,
    txt: Tensor,
    pe: Tensor,
    mods: tuple[Tensor, ...],
    lora: BlockLora,
    heads: int,
    compute: str = "bf16",
    scales: Fp8Scales | None = None,
) -> tuple[Tensor, Tensor]:
    return double_block(_dict_lin(lora, compute, scales), block, "", img, txt, mods, pe, heads)


def _single_region(
    block: nn.Module,
    x: Tensor,
    pe: Tensor,
    mods: tuple[Tensor, ...],
    lora: BlockLora,
    heads: int,
    hidden: int,
    compute: str = "bf16",
    scales: Fp8Scales | None = None,
) -> Tensor:
    return single_block(_dict_lin(lora, compute, scales), block, "", x, mods, pe, heads, hidden)


def _region_functions(compiled: bool | str | Callable) -> tuple[Callable, Callable]:
    """The per-block-type compiled functions (one graph for all double blocks, one for all single blocks)."""
    backend = _backend(compiled)
    if backend not in _REGIONS:
        _REGIONS[backend] = (
            torch.compile(_double_region, dynamic=None, backend=backend),
            torch.compile(_single_region, dynamic=None, backend=backend),
        )
    return _REGIONS[backend]


def _block_scales(scales: Fp8Scales | None, prefix: str) -> dict[str, Tensor]:
    """The fp8 weight scales of the block at `prefix`, keyed by the Linear's name inside it ('.img_attn.qkv')."""
    start = prefix + "."
    return {name[len(prefix) :]: t for name, t in (scales or {}).items() if name.startswith(start)}


def _block_lora(adapters: AdapterDeltas | None, block: nn.Module, prefix: str) -> BlockLora:
    """The adapters of `block`'s Linears, keyed by their name inside the block ('.img_attn.qkv')."""
    if adapters is None:
        return {}
    out: BlockLora = {}
    for rel, module in block.named_modules():
        if isinstance(module, nn.Linear):
            entry = adapters.fused(f"{prefix}.{rel}")
            if entry is not None:
                out[f".{rel}"] = entry
    return out


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing: a checkpointed block keeps only its inputs and is recomputed in backward. On
# Klein 4B at 1024² (H200, bf16, rank 32) each block's activations take ~0.54 GiB; checkpointing every block
# costs ~40% more time per step. A fraction in between checkpoints that share of the blocks: the knob that
# trades memory for speed. (Keeping matmul outputs and recomputing only element-wise ops saved just 3% of the
# memory in the same measurement: the wide matmul outputs are what the blocks hold.)


def checkpoint_fraction(checkpointing: bool | float) -> float:
    """Normalise `checkpointing`: False/True are 0.0/1.0; a float is the share of blocks checkpointed."""
    value = float(checkpointing)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"checkpointing={checkpointing!r}: use a share of blocks between 0.0 and 1.0.")
    return value


def _run_block(checkpointed: bool, fn: Callable, *args: Tensor, offload: bool = False):
    if not (checkpointed and torch.is_grad_enabled()):
        return fn(*args)
    if not offload:
        return checkpoint(fn, *args, use_reentrant=False)
    return _offloaded_checkpoint(fn, *args)


def _offloaded_checkpoint(fn: Callable, *args: Tensor):
    """A recomputed block whose inputs wait in host memory until backward (Klein 9B at 1024²: ~38 MB a block).

    torch's reentrant checkpoint keeps its inputs through save_for_backward, so `save_on_cpu` moves exactly them
    to (pinned) host memory and back; the non-reentrant one keeps them in a closure, out of the hooks' reach.
    Reentrant checkpointing only builds a graph when an input requires grad: the first block's input does not
    (the base is frozen), so it gets a detached copy that does (its gradient is computed and dropped).
    """
    if not any(a.requires_grad for a in args):
        args = (args[0].detach().requires_grad_(), *args[1:])
    with torch.autograd.graph.save_on_cpu(pin_memory=args[0].is_cuda):
        return checkpoint(fn, *args, use_reentrant=True)


# ----------------------------------------------------------------------------------------------------------


def klein_forward(
    model: nn.Module,
    x: Tensor,
    sigma: Tensor,
    context: Tensor,
    ref_latents: Sequence[Tensor] | None = None,
    adapters: AdapterDeltas | None = None,
    checkpointing: bool | float = False,
    compile_blocks: bool | str = False,
    compute: str = "bf16",
    offload_inputs: bool = False,
    fp8_scales: Fp8Scales | None = None,
) -> Tensor:
    """Velocity prediction v ≈ noise − x0 of a Klein model.

    x [b, 128, h, w] noisy latent (ComfyUI's `x` for Flux2: no input scaling), sigma [b] in [0, 1] (Flux's
    timestep(σ) = σ), context [b, L, ctx], ref_latents: clean reference latents [b, 128, h', w'] appended as
    extra tokens at RoPE index 10, 20, ... (reference k at 10·k, rows/cols from 0: ComfyUI's default "index"
    method for Flux2, in the order chained ReferenceLatent nodes list them) and sliced off the output.
    Returns [b, 128, h, w].
    checkpointing: False/True or the share of blocks recomputed in backward. compile_blocks: run the blocks
    through torch.compile (True = inductor, or a backend name; worth it on CUDA, the first steps pay the compile
    time). compute: "bf16", or "fp8" for the block Linears' matmuls (fp8_compute.py; the caller checks the GPU
    supports it). offload_inputs: the recomputed blocks' inputs wait in host memory until backward.
    fp8_scales: with fp8 compute, the block Linears' weight scales computed once for the run
    (fp8_compute.block_weight_scales), so no step looks for them again.
    """
    args = (model, x, sigma, context, ref_latents, adapters, checkpointing)
    if not compile_blocks:
        return _klein_forward(*args, False, compute, offload_inputs, fp8_scales)
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT):
        return _klein_forward(*args, compile_blocks, compute, offload_inputs, fp8_scales)


def _klein_forward(
    model: nn.Module,
    x: Tensor,
    sigma: Tensor,
    context: Tensor,
    ref_latents: Sequence[Tensor] | None,
    adapters: AdapterDeltas | None,
    checkpointing: bool | float,
    compile_blocks: bool | str,
    compute: str = "bf16",
    offload: bool = False,
    fp8_scales: Fp8Scales | None = None,
) -> Tensor:
    shape = read_shape(model)
    fp8_scales = fp8_scales if compute == "fp8" else None
    n_blocks = shape.double_blocks + shape.single_blocks
    n_checkpointed = round(checkpoint_fraction(checkpointing) * n_blocks)  # the first n blocks are checkpointed
    lin = _make_lin(adapters or NoAdapters(), compute, fp8_scales)
    # Regional compilation where the adapters can hand out their tensors (see _region_functions).
    regional = bool(compile_blocks) and (adapters is None or hasattr(adapters, "fused"))
    double_fn, single_fn = _block_functions(False if regional else compile_blocks)
    double_region, single_region = _region_functions(compile_blocks) if regional else (None, None)
    b, _, h, w = x.shape
    img = rearrange(x, "b c h w -> b (h w) c")
    ids = image_ids(b, h, w, 0.0, x.device)
    n_img = img.shape[1]
    for k, ref in enumerate(ref_latents or ()):
        img = torch.cat([img, rearrange(ref.to(img), "b c h w -> b (h w) c")], dim=1)
        ids = torch.cat([ids, image_ids(b, ref.shape[-2], ref.shape[-1], REF_INDEX_SCALE * (k + 1), x.device)], 1)

    # The caller picks the compute dtype through x (or autocast); ComfyUI's Linear casts its weights to it.
    img = lin(model.img_in, "img_in", img)
    temb = timestep_embedding(sigma.to(x.device)).to(img.dtype)
    vec = lin(
        model.time_in.out_layer, "time_in.out_layer", F.silu(lin(model.time_in.in_layer, "time_in.in_layer", temb))
    )
    txt = lin(model.txt_in, "txt_in", context.to(img.dtype))
    pe = rope_table(torch.cat((text_ids(b, txt.shape[1], x.device), ids), dim=1))

    double_mods = _modulation(lin, model.double_stream_modulation_img, "double_stream_modulation_img", vec, 6)
    double_mods += _modulation(lin, model.double_stream_modulation_txt, "double_stream_modulation_txt", vec, 6)
    for i, block in enumerate(model.double_blocks):
        if double_region is not None:
            prefix = f"double_blocks.{i}"
            lora, scales = _block_lora(adapters, block, prefix), _block_scales(fp8_scales, prefix)
            fn = _bind_double_region(double_region, block, lora, shape.heads, compute, scales)
        else:
            fn = _bind_double(lin, block, f"double_blocks.{i}", shape.heads, double_fn)
        img, txt = _run_block(i < n_checkpointed, fn, img, txt, pe, *double_mods, offload=offload)

    joint = torch.cat((txt, img), dim=1)
    single_mods = _modulation(lin, model.single_stream_modulation, "single_stream_modulation", vec, 3)
    for i, block in enumerate(model.single_blocks):
        if single_region is not None:
            prefix = f"single_blocks.{i}"
            lora, scales = _block_lora(adapters, block, prefix), _block_scales(fp8_scales, prefix)
            fn = _bind_single_region(single_region, block, lora, shape.heads, shape.hidden, compute, scales)
        else:
            fn = _bind_single(lin, block, f"single_blocks.{i}", shape.heads, shape.hidden, single_fn)
        joint = _run_block(shape.double_blocks + i < n_checkpointed, fn, joint, pe, *single_mods, offload=offload)
    img = joint[:, txt.shape[1] : txt.shape[1] + n_img]

    shift, scale = lin(
        model.final_layer.adaLN_modulation[1], "final_layer.adaLN_modulation.1", F.silu(vec[:, None, :])
    ).chunk(2, dim=-1)
    out = lin(model.final_layer.linear, "final_layer.linear", _layer_norm(img) * (1 + scale) + shift)
    return rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
