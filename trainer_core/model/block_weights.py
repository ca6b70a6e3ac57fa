"""Per-module LoRA strengths from the course's block map: presets, per-group strengths, or a per-block vector.

The groups come from `variants.block_groups`, computed from the model's real block counts (Klein 4B: double 0–4
binding; single 0–5 texture, 6–13 identity, 14–19 composition; Klein 9B: the same groups scaled over 8 + 24).
A module's block is read from its own name (`single_blocks.12.linear1` -> `single_blocks.12`), so block indices
are absolute: a LoRA that only has some blocks still gets the strengths of exactly those blocks. Modules outside
the blocks (img_in, txt_in, time_in, the global modulations, final_layer) get `global_strength`.

The result, `dict[module_name, float]`, is what `AdapterStack.set_lora(module_strength=...)` takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ..errors import check_number, shown
from .klein import KleinShape
from .variants import GROUPS, block_groups, block_names

PRESETS = ("all", *GROUPS, "custom")
STRENGTH_LIMIT = 100.0  # |block or group strength|: the widgets use -4..4; NaN, inf or 1e308 are refused
_BLOCK = re.compile(r"^((?:double|single)_blocks\.\d+)\.")


def block_of(module_name: str) -> str | None:
    """The block prefix of a module (`double_blocks.3`), or None for a global module."""
    m = _BLOCK.match(module_name)
    return m.group(1) if m else None


def parse_block_vector(text: str) -> list[float] | None:
    """'1, 0.5 0 …' -> [1.0, 0.5, 0.0, …]; blank -> None. Separators: commas and/or spaces."""
    items = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not items:
        return None
    values = []
    for i, item in enumerate(items):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(
                f"block vector item {i + 1} is {shown(item)}, not a number (write e.g. '1, 0.5, 0')."
            ) from None
        values.append(check_strength(value, f"block vector item {i + 1}"))
    return values


def check_strength(value: object, what: str) -> float:
    """A block or group strength: finite and within ±STRENGTH_LIMIT (NaN, inf or 1e308 would make the model's
    output non-finite with no word)."""
    return check_number(
        value,
        what,
        -STRENGTH_LIMIT,
        STRENGTH_LIMIT,
        f"use a strength between {-STRENGTH_LIMIT:g} and {STRENGTH_LIMIT:g}",
    )


def check_block_vector(vector: Sequence[float], shape: KleinShape) -> None:
    """Raise unless the vector has one value per block of the model; the error lists the blocks in order."""
    names = block_names(shape)
    if len(vector) != len(names):
        raise ValueError(
            f"the per-block vector has {len(vector)} values; this model needs {len(names)} "
            f"({shape.double_blocks} double + {shape.single_blocks} single blocks), in this order: {', '.join(names)}."
        )


def block_strengths(
    shape: KleinShape,
    preset: str = "all",
    group_strengths: Mapping[str, float] | None = None,
    block_vector: Sequence[float] | None = None,
) -> dict[str, float]:
    """Strength of every block of the model: block prefix -> multiplier.

    preset 'all': every group at its group strength; a group name: that group only (at its group strength),
    the others 0; 'custom': the per-block vector (one value per block, model order).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown block preset '{preset}': choose one of {', '.join(PRESETS)}.")
    if preset == "custom":
        if block_vector is None:
            raise ValueError("block preset 'custom' needs a per-block vector (one value per block).")
        check_block_vector(block_vector, shape)
        values = (check_strength(v, f"block vector item {i + 1}") for i, v in enumerate(block_vector))
        return dict(zip(block_names(shape), values, strict=True))
    if block_vector is not None:
        raise ValueError(
            f"a per-block vector is set but the block preset is '{preset}': choose 'custom' to use the vector, "
            "or clear it."
        )
    unknown = sorted(set(group_strengths or {}) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown block groups {unknown}: the groups are {', '.join(GROUPS)}.")
    strengths = {}
    for group, blocks in block_groups(shape).items():
        on = preset == "all" or preset == group
        value = check_strength((group_strengths or {}).get(group, 1.0), f"{group}_strength") if on else 0.0
        strengths.update(dict.fromkeys(blocks, value))
    return strengths


def module_strengths(
    module_names: Iterable[str],
    shape: KleinShape,
    preset: str = "all",
    group_strengths: Mapping[str, float] | None = None,
    block_vector: Sequence[float] | None = None,
    global_strength: float = 1.0,
) -> dict[str, float]:
    """Per-module multipliers for a LoRA's modules (AdapterStack.set_lora(module_strength=...))."""
    blocks = block_strengths(shape, preset, group_strengths, block_vector)
    global_strength = check_strength(global_strength, "global_strength")  # checked even when no module uses it
    out = {}
    for name in module_names:
        block = block_of(name)
        if block is None:
            out[name] = global_strength
        elif block in blocks:
            out[name] = blocks[block]
        else:
            raise ValueError(
                f"LoRA module '{name}' is in {block}, which this model ({shape.double_blocks} double + "
                f"{shape.single_blocks} single blocks) does not have."
            )
    return out
