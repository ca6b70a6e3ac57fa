"""Registry of FLUX.2 [klein] variants and the course's block groups, computed from real block counts.

The course's block map (Klein 4B: 5 double + 20 single blocks):
double 0–4 = text↔image binding; single 0–5 = texture/colour/low-level style; single 6–13 = parts/identity/
structure; single 14–19 = composition/layout. Other sizes keep the same four groups with the single-stream
boundaries scaled proportionally (6/20 and 14/20 of the single blocks), so presets are never tied to one size.
"""

from __future__ import annotations

from dataclasses import dataclass

from .klein import KleinShape

GROUPS = ("binding", "texture", "identity", "composition")

# How a model is sampled. Klein Base and the distilled Klein share one architecture and one weight layout, so
# nothing in the weights tells them apart: the artist says which one a render uses. The distilled Klein is
# made for 4 steps without real CFG (cfg 1); a LoRA trained on Base loads on it unchanged.
SAMPLING_AS_SET = "as set"
SAMPLING_DISTILLED = "distilled: 4 steps, cfg 1"
SAMPLING_CHOICES = (SAMPLING_AS_SET, SAMPLING_DISTILLED)
DISTILLED_STEPS, DISTILLED_CFG = 4, 1.0
GROUP_HELP = {
    "binding": "double-stream blocks: text↔image binding (trigger ↔ concept)",
    "texture": "early single-stream blocks: texture, colour, low-level style",
    "identity": "middle single-stream blocks: parts, identity, structure",
    "composition": "late single-stream blocks: composition and layout",
}


@dataclass(frozen=True)
class KleinVariant:
    name: str
    double_blocks: int
    single_blocks: int
    hidden: int
    context_dim: int
    text_encoder: str
    license: str


VARIANTS: dict[str, KleinVariant] = {
    "klein-4b": KleinVariant("klein-4b", 5, 20, 3072, 7680, "Qwen3-4B", "Apache-2.0"),
    "klein-9b": KleinVariant("klein-9b", 8, 24, 4096, 12288, "Qwen3-8B", "FLUX non-commercial"),
}


def detect_variant(shape: KleinShape) -> KleinVariant:
    """The registered variant with these dimensions, or a 'custom' entry describing the shape (tiny models)."""
    for variant in VARIANTS.values():
        if (variant.double_blocks, variant.single_blocks, variant.hidden, variant.context_dim) == (
            shape.double_blocks,
            shape.single_blocks,
            shape.hidden,
            shape.context_dim,
        ):
            return variant
    name = f"klein-custom-{shape.double_blocks}d{shape.single_blocks}s-h{shape.hidden}"
    return KleinVariant(name, shape.double_blocks, shape.single_blocks, shape.hidden, shape.context_dim, "?", "?")


def block_names(shape: KleinShape) -> list[str]:
    """All block prefixes in model order: double_blocks.0 … then single_blocks.0 …"""
    return [f"double_blocks.{i}" for i in range(shape.double_blocks)] + [
        f"single_blocks.{i}" for i in range(shape.single_blocks)
    ]


def single_group_bounds(single_blocks: int) -> tuple[int, int]:
    """Start of the identity group and of the composition group among single blocks (4B: 6 and 14)."""
    texture_end = max(1, round(single_blocks * 6 / 20))
    identity_end = max(texture_end + 1, round(single_blocks * 14 / 20))
    return texture_end, min(identity_end, single_blocks)


def block_groups(shape: KleinShape) -> dict[str, list[str]]:
    """The course's four groups as lists of block prefixes, from the model's real block counts."""
    t_end, i_end = single_group_bounds(shape.single_blocks)
    return {
        "binding": [f"double_blocks.{i}" for i in range(shape.double_blocks)],
        "texture": [f"single_blocks.{i}" for i in range(0, t_end)],
        "identity": [f"single_blocks.{i}" for i in range(t_end, i_end)],
        "composition": [f"single_blocks.{i}" for i in range(i_end, shape.single_blocks)],
    }


def block_layout(double_blocks: int, single_blocks: int) -> dict[str, object]:
    """The block editor's map of a model: block names in model order and, per group, the indices of its blocks
    in that order (what `block_groups` gives, as positions in the per-block vector)."""
    t_end, i_end = single_group_bounds(single_blocks)
    d = double_blocks
    return {
        "double": double_blocks,
        "single": single_blocks,
        "names": [f"double_blocks.{i}" for i in range(d)] + [f"single_blocks.{i}" for i in range(single_blocks)],
        "groups": {
            "binding": list(range(d)),
            "texture": list(range(d, d + t_end)),
            "identity": list(range(d + t_end, d + i_end)),
            "composition": list(range(d + i_end, d + single_blocks)),
        },
        "help": GROUP_HELP,
    }


def variant_layouts() -> dict[str, dict[str, object]]:
    """The block layout of every registered variant (the editor's choice before the node has run)."""
    return {name: block_layout(v.double_blocks, v.single_blocks) for name, v in VARIANTS.items()}
