"""Read every common FLUX.2 [klein] LoRA key style into canonical `LoraWeights`, and write each style back.

Accepted adapter types: plain LoRA (`lora_A/lora_B`, `lora_down/lora_up` and the other suffixes ComfyUI's LoRA
loader knows, with an optional `.alpha`), LoKr (`lokr_w1`/`lokr_w2` or their `_a`/`_b` factors), LoHa
(`hada_w1_a/b`, `hada_w2_a/b`), DoRA (`dora_scale`, PEFT's `lora_magnitude_vector`) and full `.diff` patches, in
each key style:

* ours / native: `diffusion_model.<module>` (also bare `<module>`), e.g. `diffusion_model.double_blocks.0.img_attn.qkv`;
  `diffusion_model.single_blocks.i.linear1_qkv` (the q/k/v rows of `linear1`, as ComfyUI maps it);
* kohya: `lora_unet_<module with dots as underscores>`, e.g. `lora_unet_double_blocks_0_img_attn_qkv`;
* diffusers: `transformer.<diffusers name>` (also bare, `base_model.model.`, and the underscored
  `lora_transformer_` / `lycoris_` forms), mapped exactly as ComfyUI's `flux_to_diffusers` does for Flux2:
  `transformer_blocks.i.attn.to_q/to_k/to_v` and `add_q_proj/add_k_proj/add_v_proj` onto row slices of the fused
  `img_attn.qkv` / `txt_attn.qkv`, `attn.to_out.0` / `attn.to_add_out` onto the projections, `ff(_context).linear_in
  / linear_out` onto the gated MLPs, `single_transformer_blocks.i.attn.to_qkv_mlp_proj` / `attn.to_out` onto
  `linear1` / `linear2`, and the global modules (`x_embedder`, `context_embedder`, time embedders, the three
  `*_modulation.linear`, `norm_out.linear` with scale/shift halves swapped, `proj_out`).

Several parts that land on one fused Linear are represented exactly as one LoRA: their downs are stacked and
their ups placed block-diagonally at their row offsets, each part's alpha/rank folded into its up rows (when the
parts share one down and one alpha, as a split of a fused LoRA does, they collapse back to that rank).

LoKr, LoHa, DoRA and `.diff` modules are read as `adapter_math.DenseAdapter` (their ΔW is dense, built with PEFT's
math when the adapter is placed); a module whose parts are all plain LoRA stays a low-rank `LoraWeights`.

Alpha: a module's `.alpha` tensor; without one, the file's own header says what the tool that wrote it applies
(`alpha_for`: PEFT's `lora_adapter_metadata` with `lora_alpha`, `alpha_pattern`, `use_rslora`); without either,
alpha = rank. kohya's loader reads alpha from the `.alpha` tensors only (`ss_network_alpha` is a record of the
training), so `ss_*` metadata is reported, not applied.

A LoRA of another architecture is refused with a `LoraFormatError` naming the mismatch (FLUX.1, Stable Diffusion
/ SDXL, a Klein of the other size); OFT, BOFT, GLoRA and LoCon CP files are refused as unsupported.
Keys that fit nothing are listed in `LoraRead.unmatched`, never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import pack_error
from ..model.klein import LATENT_CHANNELS, TIME_EMBED_DIM, KleinShape
from .adapter_math import DORA_NORM_KEY, LOHA_ROLES, LOKR_ROLES, DenseAdapter, FilePart, lokr_shape
from .adapters import LoraWeights, check_lora_weights

# A Klein Linear's adapter as read from a file: low-rank, or dense (LoKr, LoHa, DoRA, diff).
FileAdapter = LoraWeights | DenseAdapter

# Hidden size -> the Klein it belongs to (for messages).
KLEIN_SIZE_BY_HIDDEN = {3072: "4B", 4096: "9B"}
# Known block layouts (double, single) for "which model was this LoRA made for" messages.
KNOWN_LAYOUTS = (("Klein 4B", 5, 20), ("Klein 9B", 8, 24), ("FLUX.1", 19, 38))

GLOBAL_MODULES = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.lin",
    "single_stream_modulation.lin",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)


@pack_error
class LoraFormatError(ValueError):
    """The file is not a plain LoRA for this FLUX.2 [klein] model; the message names the mismatch and the fix."""


@dataclass
class LoraRead:
    """A LoRA file read into canonical form. weights: module name (relative to the diffusion model) -> LoRA."""

    weights: dict[str, FileAdapter]
    unmatched: list[str] = field(default_factory=list)
    source_format: str = "unknown"
    adapter_types: str = "LoRA"
    notes: list[str] = field(default_factory=list)  # what the file's header said and how it was applied

    def report(self) -> str:
        """One line for the UI and the log: what was loaded and what was not."""
        text = f"{len(self.weights)} modules loaded ({self.source_format}, {self.adapter_types})"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        if self.unmatched:
            shown = ", ".join(self.unmatched[:8]) + (" …" if len(self.unmatched) > 8 else "")
            text += f"; {len(self.unmatched)} keys NOT loaded: {shown}"
        return text


def klein_linear_shapes(shape: KleinShape) -> dict[str, tuple[int, int]]:
    """Every Linear of a Klein with these dimensions: module name -> (out_features, in_features)."""
    h, mlp = shape.hidden, shape.mlp_hidden
    out: dict[str, tuple[int, int]] = {
        "img_in": (h, LATENT_CHANNELS),
        "txt_in": (h, shape.context_dim),
        "time_in.in_layer": (h, TIME_EMBED_DIM),
        "time_in.out_layer": (h, h),
        "double_stream_modulation_img.lin": (6 * h, h),
        "double_stream_modulation_txt.lin": (6 * h, h),
        "single_stream_modulation.lin": (3 * h, h),
        "final_layer.linear": (LATENT_CHANNELS, h),
        "final_layer.adaLN_modulation.1": (2 * h, h),
    }
    for i in range(shape.double_blocks):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            out[f"{p}_attn.qkv"] = (3 * h, h)
            out[f"{p}_attn.proj"] = (h, h)
            out[f"{p}_mlp.0"] = (2 * mlp, h)
            out[f"{p}_mlp.2"] = (h, mlp)
    for i in range(shape.single_blocks):
        out[f"single_blocks.{i}.linear1"] = (3 * h + 2 * mlp, h)
        out[f"single_blocks.{i}.linear2"] = (h, h + mlp)
    return out


# ----------------------------------------------------------------------------------------------------------
# Key anatomy: <prefix><module><suffix>, suffix -> role.

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_A", "down"),
    (".lora_B", "up"),
    (".alpha", "alpha"),
    *((f".{role}", role) for role in (*LOKR_ROLES, *LOHA_ROLES)),
    (".dora_scale", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
)

_UNSUPPORTED = (
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R)"), "OFT"),
    (re.compile(r"\.boft_"), "BOFT"),
    (re.compile(r"\.[ab][12]\.weight$"), "GLoRA"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with a CP mid weight"),
    (re.compile(r"\.(lokr_t2|hada_t1|hada_t2)$"), "Tucker-form (convolution) LyCORIS"),
)

_FLUX1 = re.compile(
    r"double_blocks[._]\d+[._](img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation[._]lin"
    r"|(^|[._])(vector_in|guidance_in)[._]|transformer_blocks[._]\d+[._]norm1(_context)?[._]linear"
    r"|single_transformer_blocks[._]\d+[._](norm[._]linear|proj_mlp)|time_text_embed[._](text|guidance)_embedder"
)
_SD_UNET = re.compile(r"(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)[._]\d")

_DOTTED_PREFIXES = (
    ("diffusion_model.", "native"),
    ("model.diffusion_model.", "native"),
    ("transformer.", "diffusers"),
    ("base_model.model.", "diffusers"),
    ("unet.", "diffusers"),
)
_UNDERSCORED_PREFIXES = (("lora_unet_", "kohya"), ("lora_transformer_", "diffusers"), ("lycoris_", "diffusers"))


def _swap_halves(up: Tensor) -> Tensor:
    """diffusers' norm_out.linear emits (scale, shift); Klein's final adaLN emits (shift, scale)."""
    a, b = up.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


@dataclass(frozen=True)
class _Target:
    """Where a source module lands: target Linear, its q/k/v slice (part index) and an optional row transform."""

    module: str
    part: int | None = None  # 0/1/2: q/k/v rows of a fused qkv (each `hidden` rows)
    transform: Callable[[Tensor], Tensor] | None = None


_NATIVE_BLOCK = re.compile(
    r"(double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12])"
)
_NATIVE_LINEAR1_QKV = re.compile(r"(single_blocks\.\d+)\.linear1_qkv")

_DIFFUSERS_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_DIFFUSERS_DOUBLE = {
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
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_qkv_mlp_proj": ("linear1", None),
    "attn.to_out": ("linear2", None),
    "proj_out": ("linear2", None),
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
}
_DIFFUSERS_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)")


def _resolve_native(name: str) -> _Target | None:
    if name in GLOBAL_MODULES or _NATIVE_BLOCK.fullmatch(name):
        return _Target(name)
    m = _NATIVE_LINEAR1_QKV.fullmatch(name)
    return _Target(f"{m.group(1)}.linear1", part=-1) if m else None  # -1: rows 0..3h (q, k and v at once)


def _resolve_diffusers(name: str) -> _Target | None:
    if name == "norm_out.linear":
        return _Target("final_layer.adaLN_modulation.1", transform=_swap_halves)
    if name in _DIFFUSERS_GLOBAL:
        return _Target(_DIFFUSERS_GLOBAL[name])
    m = _DIFFUSERS_BLOCK.fullmatch(name)
    if not m:
        return None
    kind, index, rest = m.groups()
    table, native = (
        (_DIFFUSERS_SINGLE, "single_blocks") if kind.startswith("single") else (_DIFFUSERS_DOUBLE, "double_blocks")
    )
    if rest not in table:
        return None
    module, part = table[rest]
    return _Target(f"{native}.{index}.{module}", part=part)


# Underscored names are ambiguous in general (module names contain '_'), so they are resolved by matching the
# underscored form of every name pattern the dotted resolvers know.
_UNDERSCORED_NATIVE = re.compile(
    r"(?P<b>double_blocks)_(?P<i>\d+)_(?P<s>img|txt)_(?P<m>attn_qkv|attn_proj|mlp_0|mlp_2)"
    r"|(?P<sb>single_blocks)_(?P<si>\d+)_(?P<sm>linear1|linear2)"
)
_UNDERSCORED_DIFFUSERS = re.compile(r"(?P<kind>single_transformer_blocks|transformer_blocks)_(?P<i>\d+)_(?P<rest>.+)")


def _underscored_to_dotted(name: str, style: str) -> str | None:
    """kohya / OneTrainer / LyCORIS underscored module name -> the dotted name, or None."""
    if style == "kohya":
        for g in GLOBAL_MODULES:
            if name == g.replace(".", "_"):
                return g
        m = _UNDERSCORED_NATIVE.fullmatch(name)
        if not m:
            return None
        if m.group("b"):
            return f"double_blocks.{m.group('i')}.{m.group('s')}_{m.group('m').replace('_', '.')}"
        return f"single_blocks.{m.group('si')}.{m.group('sm')}"
    for g in (*_DIFFUSERS_GLOBAL, "norm_out.linear"):
        if name == g.replace(".", "_"):
            return g
    m = _UNDERSCORED_DIFFUSERS.fullmatch(name)
    if not m:
        return None
    table = _DIFFUSERS_SINGLE if m.group("kind").startswith("single") else _DIFFUSERS_DOUBLE
    for rest in table:
        if m.group("rest") == rest.replace(".", "_"):
            return f"{m.group('kind')}.{m.group('i')}.{rest}"
    return None


def _resolve(module_key: str) -> tuple[_Target, str] | None:
    """A source module name (key without its LoRA suffix) -> (target, style) or None."""
    for prefix, style in _UNDERSCORED_PREFIXES:
        if module_key.startswith(prefix):
            name = module_key[len(prefix) :]
            dotted = _underscored_to_dotted(name, "kohya")  # native names (kohya's own), else diffusers names
            if dotted is not None:
                return _resolve_native(dotted), style
            dotted = _underscored_to_dotted(name, "diffusers")
            target = _resolve_diffusers(dotted) if dotted is not None else None
            return (target, style) if target else None
    for prefix, style in _DOTTED_PREFIXES:
        if module_key.startswith(prefix):
            rest = module_key[len(prefix) :]
            target = _resolve_native(rest) if style == "native" else _resolve_diffusers(rest)
            if target is None:  # some trainers put diffusers names under diffusion_model. and vice versa
                target = _resolve_diffusers(rest) if style == "native" else _resolve_native(rest)
            return (target, style) if target else None
    target = _resolve_native(module_key)
    if target:
        return target, "native"
    target = _resolve_diffusers(module_key)
    return (target, "diffusers") if target else None


# ----------------------------------------------------------------------------------------------------------
# Reading.


@dataclass
class _Part:
    source: str  # module key in the file
    target: _Target
    kind: str  # "lora", "lokr", "loha" or "diff"
    tensors: dict[str, Tensor]  # role -> tensor (down/up for LoRA)
    alpha: float | None  # the file's alpha for this module (None: not given)
    out_in: tuple[int, int]  # (rows written, in features)
    magnitude: Tensor | None = None  # DoRA

    @property
    def down(self) -> Tensor:
        return self.tensors["down"]

    @property
    def up(self) -> Tensor:
        return self.tensors["up"]

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.down.shape[0]

    @property
    def plain(self) -> bool:
        return self.kind == "lora" and self.magnitude is None


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _refuse_foreign(keys: list[str]) -> None:
    """Raise for LyCORIS variants, FLUX.1 and Stable Diffusion LoRAs (recognised from their key names)."""
    for key in keys:
        for pattern, kind in _UNSUPPORTED:
            if pattern.search(key):
                raise LoraFormatError(
                    f"this is a {kind} file (key '{key}'): the Klein LoRA Lab loaders read LoRA, LoKr, LoHa, DoRA "
                    "and .diff patches on Linear layers; use core's 'Load LoRA' node for this one."
                )
    for key in keys:
        if _FLUX1.search(key):
            raise LoraFormatError(
                f"this LoRA was made for FLUX.1, not FLUX.2 [klein]: it has per-block modulation / FLUX.1-only "
                f"modules (key '{key}'); FLUX.1 has 19 double + 38 single blocks of hidden 3072 with MLP ratio 4, "
                "Klein has global modulation and gated MLPs. Use a LoRA trained on FLUX.2 [klein]."
            )
    for key in keys:
        if _SD_UNET.search(key):
            raise LoraFormatError(
                f"this LoRA was made for Stable Diffusion / SDXL (UNet key '{key}'), not FLUX.2 [klein]. "
                "Use a LoRA trained on FLUX.2 [klein]."
            )


def _layout_name(double: int, single: int) -> str:
    for name, d, s in KNOWN_LAYOUTS:
        if double <= d and single <= s:
            return f"{name} ({d} double + {s} single blocks)"
    return f"a model with at least {double} double + {single} single blocks"


def _size_name(hidden: int) -> str:
    return KLEIN_SIZE_BY_HIDDEN.get(hidden, "a custom size")


def _check_blocks(parts: list[_Part], shape: KleinShape) -> None:
    """Refuse block indices the model does not have (absolute indices from the key names)."""
    max_d, max_s = -1, -1
    for p in parts:
        kind, _, rest = p.target.module.partition(".")
        if kind == "double_blocks":
            max_d = max(max_d, int(rest.split(".")[0]))
        elif kind == "single_blocks":
            max_s = max(max_s, int(rest.split(".")[0]))
    if max_d < shape.double_blocks and max_s < shape.single_blocks:
        return
    raise LoraFormatError(
        f"this LoRA uses blocks up to double_blocks.{max_d} / single_blocks.{max_s}, but the loaded model has "
        f"{shape.double_blocks} double + {shape.single_blocks} single blocks (hidden {shape.hidden}, "
        f"{_size_name(shape.hidden)}): it was made for {_layout_name(max_d + 1, max_s + 1)}. "
        "Load the model this LoRA was trained on."
    )


def _check_dims(parts: list[_Part], shape: KleinShape, expected: Mapping[str, tuple[int, int]]) -> None:
    """Refuse parts whose in/out dims differ from the model's Linear shapes, naming the likely cause."""
    hidden_in = {m for m in expected if expected[m][1] == shape.hidden}
    for p in parts:
        if p.target.module not in expected:
            continue  # a block the model does not have: _check_blocks names it
        out_f, in_f = expected[p.target.module]
        rows = _part_rows(p.target, out_f, shape.hidden)
        p_out, p_in = p.out_in
        if p_in == in_f and p_out == rows[1] - rows[0]:
            continue
        if p.target.module in hidden_in and p_in != shape.hidden:
            lora_hidden = p_in
            if lora_hidden == 3072 and p.target.module.endswith(("mlp.0", "linear1")) and p_out in (12288, 21504):
                raise LoraFormatError(
                    f"this LoRA was made for FLUX.1 (module '{p.source}' has MLP ratio 4), not FLUX.2 [klein]."
                )
            raise LoraFormatError(
                f"this LoRA was made for a Klein with hidden {lora_hidden} ({_size_name(lora_hidden)}); the loaded "
                f"model is hidden {shape.hidden} ({_size_name(shape.hidden)}) (module '{p.source}'). "
                "Load the Klein this LoRA was trained on."
            )
        raise LoraFormatError(
            f"LoRA module '{p.source}' does not fit '{p.target.module}': the LoRA maps in {p_in} -> out "
            f"{p_out}, the model's Linear is in {in_f} -> out {rows[1] - rows[0]} (rows {rows[0]}:{rows[1]}). "
            "This LoRA was made for a different model."
        )


def _part_rows(target: _Target, out_features: int, hidden: int) -> tuple[int, int]:
    """Row range [start, end) of the target Linear's output that a part writes."""
    if target.part is None:
        return 0, out_features
    if target.part == -1:
        return 0, 3 * hidden
    return target.part * hidden, (target.part + 1) * hidden


def _combine(module: str, parts: list[_Part], out_features: int, hidden: int) -> LoraWeights:
    """The exact single LoRA of a target Linear from its plain-LoRA parts (whole module, or q/k/v row slices)."""
    if len(parts) == 1 and parts[0].target.part is None:
        p = parts[0]
        up = p.target.transform(p.up) if p.target.transform else p.up
        return LoraWeights(p.down, up, p.lora_alpha)
    rows = [_part_rows(p.target, out_features, hidden) for p in parts]
    first = parts[0]
    same_down = all(p.down.shape == first.down.shape and torch.equal(p.down, first.down) for p in parts)
    if same_down and all(p.lora_alpha == first.lora_alpha for p in parts):
        # A split fused LoRA (one down shared by q, k, v): collapse back to its own rank and alpha.
        up = first.up.new_zeros(out_features, first.down.shape[0])
        for p, (r0, r1) in zip(parts, rows, strict=True):
            up[r0:r1] = p.up
        return LoraWeights(first.down, up, first.lora_alpha)
    # Independent parts: stacked downs [Σr, in], block-diagonal up [out, Σr], each part's alpha/rank folded in.
    rank = sum(p.down.shape[0] for p in parts)
    down = torch.cat([p.down.float() for p in parts], dim=0)
    up = torch.zeros(out_features, rank, dtype=torch.float32, device=down.device)
    col = 0
    for p, (r0, r1) in zip(parts, rows, strict=True):
        r = p.down.shape[0]
        up[r0:r1, col : col + r] = p.up.float() * p.scale
        col += r
    return LoraWeights(down, up, float(rank))


def _dense(
    parts: list[_Part], out_features: int, in_features: int, hidden: int, norm_of_base: bool = False
) -> DenseAdapter:
    """A target Linear whose parts include LoKr, LoHa, DoRA or diff: one dense adapter over its row slices."""
    file_parts = tuple(
        FilePart(
            p.source,
            p.kind,
            p.tensors,
            p.lora_alpha if p.kind == "lora" else p.alpha,
            _part_rows(p.target, out_features, hidden),
            p.magnitude,
            p.target.transform,
            norm_of_base,
        )
        for p in parts
    )
    return DenseAdapter(file_parts, out_features, in_features)


# ------------------------------------------------------------------------------------------------------------
# What a file says about itself (safetensors header).

PEFT_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class PeftHeader:
    """PEFT's LoraConfig as diffusers writes it into `lora_adapter_metadata` (the transformer's part)."""

    r: int | None
    lora_alpha: float | None
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    use_rslora: bool
    use_dora: bool

    def scale_for(self, module_key: str, rank: int) -> float | None:
        """The scale PEFT gives module `module_key` of rank `rank`: alpha/r (alpha/√r with rsLoRA), where alpha
        comes from `alpha_pattern` (PEFT's own pattern matching) or `lora_alpha`; None when no alpha is given."""
        from peft.utils.other import get_pattern_key

        name = module_key.removeprefix("transformer.").removeprefix("base_model.model.")
        alpha_key = get_pattern_key(list(self.alpha_pattern), name)
        alpha = self.alpha_pattern.get(alpha_key, self.lora_alpha)
        if alpha is None:
            return None
        return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)


def peft_header(metadata: Mapping[str, str] | None) -> PeftHeader | None:
    """The PEFT LoraConfig in a file's header, or None. diffusers prefixes the keys with the component name
    (`transformer.lora_alpha`); PEFT's own files do not."""
    raw = (metadata or {}).get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"the file's '{PEFT_METADATA_KEY}' header is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        return None
    if any(k.startswith("transformer.") for k in data):
        data = {k.removeprefix("transformer."): v for k, v in data.items() if k.startswith("transformer.")}
    return PeftHeader(
        r=data.get("r"),
        lora_alpha=data.get("lora_alpha"),
        rank_pattern=data.get("rank_pattern") or {},
        alpha_pattern=data.get("alpha_pattern") or {},
        use_rslora=bool(data.get("use_rslora", False)),
        use_dora=bool(data.get("use_dora", False)),
    )


def kohya_note(metadata: Mapping[str, str] | None) -> str | None:
    """A short record of a kohya/musubi `ss_*` header (reported only: kohya's loader reads `.alpha` tensors)."""
    meta = metadata or {}
    fields = [
        (k, meta.get(k)) for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version")
    ]
    shown = ", ".join(f"{k.removeprefix('ss_')} {v}" for k, v in fields if v)
    return f"kohya header: {shown}" if shown else None


# ------------------------------------------------------------------------------------------------------------
# Reading.


def _make_part(module_key: str, target: _Target, tensors: dict[str, Tensor], header: PeftHeader | None) -> _Part | None:
    """The part a module's tensors form (LoRA, LoKr, LoHa or diff), or None when they form none."""
    given = float(tensors["alpha"].item()) if "alpha" in tensors else None
    magnitude = tensors.get("magnitude")
    if "down" in tensors and "up" in tensors:
        down, up = tensors["down"], tensors["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFormatError(
                f"LoRA module '{module_key}': down {tuple(down.shape)} and up {tuple(up.shape)} are not a plain "
                "linear LoRA pair ([rank, in] and [out, rank])."
            )
        rank = down.shape[0]
        if rank == 0:
            raise LoraFormatError(f"LoRA module '{module_key}' has rank 0 (an empty LoRA pair): the file is broken.")
        if given is None and header is not None:
            scale = header.scale_for(module_key, rank)
            given = None if scale is None else scale * rank
        return _Part(
            module_key, target, "lora", {"down": down, "up": up}, given, (up.shape[0], down.shape[1]), magnitude
        )
    lokr = {r: tensors[r] for r in LOKR_ROLES if r in tensors}
    if lokr:
        has_w1 = "lokr_w1" in lokr or {"lokr_w1_a", "lokr_w1_b"} <= set(lokr)
        has_w2 = "lokr_w2" in lokr or {"lokr_w2_a", "lokr_w2_b"} <= set(lokr)
        if not (has_w1 and has_w2) or any(t.ndim != 2 for t in lokr.values()):
            return None
        return _Part(module_key, target, "lokr", lokr, given, lokr_shape(lokr), magnitude)
    loha = {r: tensors[r] for r in LOHA_ROLES if r in tensors}
    if loha:
        if set(loha) != {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} or any(t.ndim != 2 for t in loha.values()):
            return None
        return _Part(
            module_key, target, "loha", loha, given, (loha["hada_w1_a"].shape[0], loha["hada_w1_b"].shape[1]), magnitude
        )
    if "diff" in tensors and tensors["diff"].ndim == 2:
        diff = tensors["diff"]
        return _Part(module_key, target, "diff", {"diff": diff}, None, (diff.shape[0], diff.shape[1]))
    return None


def read_lora(
    state_dict: Mapping[str, Tensor], shape: KleinShape, metadata: Mapping[str, str] | None = None
) -> LoraRead:
    """Read a LoRA state dict of any accepted key style and adapter type for a Klein of `shape`.

    `metadata` is the file's safetensors header (PEFT's `lora_adapter_metadata` supplies the alpha of files
    without `.alpha` tensors). Raises LoraFormatError for LoRAs of another architecture or size, and for
    unsupported adapter types.
    """
    keys = sorted(state_dict)
    _refuse_foreign(keys)
    header = peft_header(metadata)
    groups: dict[str, dict[str, str]] = {}  # module key -> role -> full key
    unmatched: list[str] = []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = key

    parts: list[_Part] = []
    styles: set[str] = set()
    for module_key, roles in groups.items():
        resolved = _resolve(module_key)
        part = None
        if resolved is not None:
            part = _make_part(module_key, resolved[0], {r: state_dict[k] for r, k in roles.items()}, header)
        if part is None:
            unmatched.extend(roles.values())
            continue
        if "diff_b" in roles:  # Klein's Linears have no bias
            unmatched.append(roles["diff_b"])
        parts.append(part)
        styles.add(resolved[1])

    if not parts:
        shown = ", ".join(keys[:5])
        raise LoraFormatError(
            f"no key of this file is a LoRA for a FLUX.2 [klein] diffusion model (first keys: {shown}). "
            "It was made for another model (or holds only text-encoder weights)."
        )
    expected = klein_linear_shapes(shape)
    _check_dims(parts, shape, expected)  # first: a hidden-size mismatch is the clearest message for another size
    _check_blocks(parts, shape)

    by_target: dict[str, list[_Part]] = {}
    for p in parts:
        kept = by_target.setdefault(p.target.module, [])
        rows = _part_rows(p.target, expected[p.target.module][0], shape.hidden)
        overlap = any(
            max(rows[0], q0) < min(rows[1], q1)
            for q0, q1 in (_part_rows(q.target, expected[q.target.module][0], shape.hidden) for q in kept)
        )
        if overlap:  # two keys for the same rows (e.g. the same module in two key styles): keep the first
            unmatched.append(f"{p.source} (duplicate of {kept[0].source})")
            continue
        kept.append(p)
    weights: dict[str, FileAdapter] = {}
    base_norm = (metadata or {}).get(DORA_NORM_KEY) == "base"
    for m, ps in sorted(by_target.items()):
        out_f, in_f = expected[m]
        plain = all(p.plain for p in ps)
        weights[m] = _combine(m, ps, out_f, shape.hidden) if plain else _dense(ps, out_f, in_f, shape.hidden, base_norm)
    kinds = {("DoRA " if p.magnitude is not None else "") + _KIND_NAMES[p.kind] for p in parts}
    notes = []
    if header is not None and any(p.kind == "lora" and "alpha" not in groups[p.source] for p in parts):
        notes.append(
            f"alpha from the file's {PEFT_METADATA_KEY} (lora_alpha {header.lora_alpha}, r {header.r}"
            + (", rsLoRA" if header.use_rslora else "")
            + ")"
        )
    note = kohya_note(metadata)
    if note:
        notes.append(note)
    if base_norm and any(p.magnitude is not None for p in parts):
        notes.append("DoRA magnitudes over the base weight's row norm, as the file's header says (core's rule)")
    return LoraRead(weights, sorted(unmatched), "+".join(sorted(styles)), ", ".join(sorted(kinds)), notes)


_KIND_NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "diff": "diff"}


def load_state_dict(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Tensors of a LoRA file (.safetensors, or a torch pickle read with weights_only), read onto `device`
    (straight from the file mapping: no intermediate CPU copy when `device` is a GPU)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .lora_file import unreadable_message

        try:
            return load_file(str(path), device=str(device))
        except SafetensorError as err:
            raise LoraFormatError(unreadable_message(path, err)) from err
    data = torch.load(str(path), map_location=device, weights_only=True)
    if not isinstance(data, dict):
        raise LoraFormatError(f"{path.name}: not a LoRA state dict (found {type(data).__name__}).")
    return data


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata of a LoRA file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_lora_file(path: str | Path, shape: KleinShape, device: torch.device | str = "cpu") -> LoraRead:
    """Read a LoRA file for a Klein of `shape` onto `device`; errors name the file."""
    state_dict = load_state_dict(path, device)  # its errors name the file already
    bad = sorted(k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise LoraFormatError(
            f"{Path(path).name}: tensor {bad[0]!r} holds NaN/Inf values ({len(bad)} tensor(s) in all): the LoRA is "
            "broken (its training diverged). Fix: use an earlier checkpoint or another file."
        )
    try:
        read = read_lora(state_dict, shape, read_metadata(path))
    except LoraFormatError as err:
        raise LoraFormatError(f"{Path(path).name}: {err}") from err
    try:
        check_lora_weights({n: w for n, w in read.weights.items() if isinstance(w, LoraWeights)}, Path(path).name)
        check_dense_adapters({n: w for n, w in read.weights.items() if isinstance(w, DenseAdapter)}, Path(path).name)
    except ValueError as err:
        raise LoraFormatError(str(err)) from err
    return read


def check_dense_adapters(adapters: Mapping[str, DenseAdapter], source: str) -> None:
    """Refuse a LoKr / LoHa / DoRA / diff module whose tensors or alpha are not finite (its ΔW would be NaN)."""
    for name, adapter in adapters.items():
        for part in adapter.parts:
            if part.alpha is not None and not math.isfinite(part.alpha):
                raise ValueError(f"{source}: module {name!r} has alpha {part.alpha!r}. Fix: use another file.")
            for role, tensor in part.tensors.items():
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"{source}: module {name!r} has non-finite {role} values. Fix: use another file.")


# ----------------------------------------------------------------------------------------------------------
# Writers in other tools' key styles (the "Save LoRA as…" export).


def write_peft(weights: Mapping[str, LoraWeights], down_up: bool = False, with_alpha: bool = True) -> dict[str, Tensor]:
    """Ours: `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha` (`lora_down/up` if down_up).

    Without alpha the reader assumes alpha = rank, so alpha/rank is folded into the up weights.
    """
    a, b = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        out[f"diffusion_model.{name}.{a}.weight"] = w.down.contiguous()
        if with_alpha:
            out[f"diffusion_model.{name}.{b}.weight"] = w.up.contiguous()
            out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(w.alpha))
        else:
            out[f"diffusion_model.{name}.{b}.weight"] = (w.up * w.scale).contiguous()
    return out


def write_kohya(weights: Mapping[str, LoraWeights]) -> dict[str, Tensor]:
    """kohya: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`."""
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = w.down.contiguous()
        out[f"{key}.lora_up.weight"] = w.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha))
    return out


_DIFFUSERS_GLOBAL_INV = {
    native: dotted for dotted, native in _DIFFUSERS_GLOBAL.items() if not dotted.startswith("time_text_embed")
}
_DOUBLE_INV = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_QKV_PARTS = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def write_diffusers(weights: Mapping[str, LoraWeights]) -> dict[str, Tensor]:
    """diffusers / PEFT: `transformer.<diffusers name>.lora_A.weight` / `.lora_B.weight`, no alpha key.

    Fused qkv LoRAs are split into to_q/to_k/to_v (add_*_proj for text) sharing the down; alpha/rank is folded
    into the ups (diffusers files carry no alpha); norm_out.linear gets diffusers' (scale, shift) row order.
    """
    out: dict[str, Tensor] = {}

    def put(name: str, down: Tensor, up: Tensor) -> None:
        # own storage per key: safetensors refuses tensors that share memory (the split qkv shares one down)
        out[f"transformer.{name}.lora_A.weight"] = down.clone(memory_format=torch.contiguous_format)
        out[f"transformer.{name}.lora_B.weight"] = up.clone(memory_format=torch.contiguous_format)

    for name, w in weights.items():
        up = w.up * w.scale
        if name == "final_layer.adaLN_modulation.1":
            put("norm_out.linear", w.down, _swap_halves(up))
        elif name in _DIFFUSERS_GLOBAL_INV:
            put(_DIFFUSERS_GLOBAL_INV[name], w.down, up)
        elif name.startswith("double_blocks."):
            _, index, module = name.split(".", 2)
            prefix = f"transformer_blocks.{index}.attn." if module in _QKV_PARTS else f"transformer_blocks.{index}."
            if module in _QKV_PARTS:
                for part, rows in zip(_QKV_PARTS[module], up.chunk(3, dim=0), strict=True):
                    put(prefix + part, w.down, rows)
            else:
                put(prefix + _DOUBLE_INV[module], w.down, up)
        elif name.startswith("single_blocks."):
            _, index, module = name.split(".", 2)
            diffusers = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}[module]
            put(f"single_transformer_blocks.{index}.{diffusers}", w.down, up)
        else:
            raise ValueError(f"write_diffusers: no diffusers name for module '{name}'.")
    return out
