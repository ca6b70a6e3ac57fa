"""Which Linear modules of a Klein model a LoRA trains: a small spec language, always checked against the model.

Spec forms (module names are relative to the diffusion model, e.g. `double_blocks.0.img_attn.qkv`):

* `attention` (default): the attention layers of every block. Double blocks: `img_attn.qkv`, `img_attn.proj`,
  `txt_attn.qkv`, `txt_attn.proj`. Single blocks have no separate attention Linears: `linear1` fuses the
  q/k/v projection with the MLP input and `linear2` fuses the attention output projection with the MLP output.
  Both are included, because "attention across all blocks" (the course's default) can only reach the single
  blocks' attention through them; diffusers names them `attn.to_qkv_mlp_proj` and `attn.to_out`, so they are
  what attention-only PEFT targets select on a diffusers Flux2 model as well.
* `all_linear`: every Linear inside the blocks (attention plus `img_mlp.0/2`, `txt_mlp.0/2`).
* block groups of the course (variants.block_groups): `binding`, `texture`, `identity`, `composition`,
  comma-separated (`binding,identity`); a bare selection trains its attention layers.
* explicit blocks: `blocks:double.0,double.3,single.5-9` (ranges inclusive).
* a layer set on a block selection: `all_linear@texture`, `attention@blocks:single.0-3`.
* `regex:<pattern>`: every Linear whose full name matches the pattern (fullmatch), anywhere in the model. The
  pattern runs on RE2 (user_regex.py: linear time, so a hostile pattern cannot stall the server).

Only `torch.nn.Linear` modules (ComfyUI's ops Linear subclasses it) with a 2-D weight are targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import shown
from .klein import read_shape
from .user_regex import compile_user_regex
from .variants import GROUPS, block_groups

LAYER_SETS = ("attention", "all_linear")
DOUBLE_ATTENTION = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj")
SINGLE_ATTENTION = ("linear1", "linear2")
_BLOCK_RE = re.compile(r"^(double|single)\.(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class TargetSpec:
    """A parsed spec: a regex, or a layer set over a block selection (groups or explicit blocks; none = all)."""

    layer_set: str = "attention"
    groups: tuple[str, ...] = ()
    blocks: tuple[tuple[str, int, int], ...] = ()  # (kind "double"|"single", first, last) inclusive
    regex: str | None = None


def _syntax_help() -> str:
    return (
        "use 'attention', 'all_linear', block groups like 'binding,identity' (groups: "
        + ", ".join(GROUPS)
        + "), 'blocks:double.0,single.5-9', a layer set on a selection like 'all_linear@texture', "
        "or 'regex:<pattern>'"
    )


def _parse_blocks(text: str) -> tuple[tuple[str, int, int], ...]:
    out = []
    for part in text.split(","):
        m = _BLOCK_RE.match(part.strip())
        if m is None:
            raise ValueError(f"block {shown(part.strip())} is not like 'double.0' or 'single.5-9'")
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) is not None else first
        if last < first:
            raise ValueError(f"block range {shown(part.strip())} runs backwards")
        out.append((m.group(1), first, last))
    return tuple(out)


def parse_spec(spec: str) -> TargetSpec:
    """Parse a spec without a model (syntax only); ValueError explains the syntax."""
    spec = spec.strip()
    if spec.startswith("regex:"):
        pattern = spec[len("regex:") :]
        if not pattern:
            raise ValueError("the regex is empty")
        compile_user_regex(pattern, "the regex")  # linear-time engine; refuses what it cannot bound
        return TargetSpec(regex=pattern)
    layer_set, _, selection = spec.partition("@") if "@" in spec else ("", "", spec)
    if not layer_set:
        if spec in LAYER_SETS:
            return TargetSpec(layer_set=spec)
        layer_set = "attention"
    if layer_set not in LAYER_SETS:
        raise ValueError(f"layer set {shown(layer_set)} is unknown; {_syntax_help()}")
    selection = selection.strip()
    if selection.startswith("blocks:"):
        return TargetSpec(layer_set=layer_set, blocks=_parse_blocks(selection[len("blocks:") :]))
    groups = tuple(g.strip() for g in selection.split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"{shown(unknown or selection)} is not a block group; {_syntax_help()}")
    return TargetSpec(layer_set=layer_set, groups=groups)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear-like module (nn.Linear or subclass, 2-D weight) by name, in model order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and getattr(module, "weight", None) is not None and module.weight.ndim == 2
    }


def _in_layer_set(layer_set: str, block: str, name: str) -> bool:
    suffix = name[len(block) + 1 :]
    if layer_set == "all_linear":
        return True
    allowed = DOUBLE_ATTENTION if block.startswith("double_blocks.") else SINGLE_ATTENTION
    return suffix in allowed


def _selected_blocks(model: nn.Module, spec: TargetSpec) -> list[str]:
    shape = read_shape(model)
    if spec.groups:
        groups = block_groups(shape)
        return [block for g in spec.groups for block in groups[g]]
    if spec.blocks:
        counts = {"double": shape.double_blocks, "single": shape.single_blocks}
        out = []
        for kind, first, last in spec.blocks:
            if last >= counts[kind]:
                raise ValueError(
                    f"targets: block {kind}.{last} does not exist; this model has double.0-"
                    f"{shape.double_blocks - 1} and single.0-{shape.single_blocks - 1}."
                )
            out += [f"{kind}_blocks.{i}" for i in range(first, last + 1)]
        return out
    return [f"double_blocks.{i}" for i in range(shape.double_blocks)] + [
        f"single_blocks.{i}" for i in range(shape.single_blocks)
    ]


def _describe(model: nn.Module, linears: dict[str, nn.Linear]) -> str:
    """What exists: block counts, groups and the Linear names of one double and one single block."""
    shape = read_shape(model)
    groups = block_groups(shape)
    group_text = "; ".join(f"{g}: {v[0]}…{v[-1]}" if v else f"{g}: (none)" for g, v in groups.items())
    kinds = sorted({re.sub(r"^(double|single)_blocks\.\d+\.", r"\1_blocks.N.", n) for n in linears})
    return (
        f"The model has {shape.double_blocks} double and {shape.single_blocks} single blocks ({group_text}) and "
        f"these Linear modules: {', '.join(kinds)}."
    )


def resolve_targets(model: nn.Module, spec: str) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every Linear the spec selects, in model order.

    Raises ValueError naming the spec and listing what exists when the spec is invalid or selects nothing.
    """
    try:
        parsed = parse_spec(spec)
    except ValueError as err:
        raise ValueError(f"targets={shown(spec)}: {err}.") from err
    linears = linear_modules(model)
    if parsed.regex is not None:
        pattern = compile_user_regex(parsed.regex, "the regex")
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        blocks = _selected_blocks(model, parsed)
        chosen = [n for n in linears for b in blocks if n.startswith(b + ".") and _in_layer_set(parsed.layer_set, b, n)]
        order = {n: i for i, n in enumerate(linears)}
        chosen = sorted(set(chosen), key=order.__getitem__)
    if not chosen:
        raise ValueError(f"targets={shown(spec)} matches no Linear module of this model. {_describe(model, linears)}")
    return {n: (linears[n].in_features, linears[n].out_features) for n in chosen}
