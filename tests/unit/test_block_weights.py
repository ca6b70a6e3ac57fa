"""Block presets, per-group strengths and per-block vectors on 4B- and 9B-shaped tiny Kleins."""

from __future__ import annotations

import copy

import pytest
import torch
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack, LoraWeights
from klein_lora_lab.trainer_core.lora.lora_formats import klein_linear_shapes, read_lora, write_kohya
from klein_lora_lab.trainer_core.model.block_weights import (
    block_strengths,
    module_strengths,
    parse_block_vector,
)
from klein_lora_lab.trainer_core.model.klein import KleinShape, klein_forward, read_shape
from klein_lora_lab.trainer_core.model.tiny import (
    SPEC_4B_SHAPED,
    SPEC_9B_SHAPED,
    TinySpec,
    tiny_conditioning,
    tiny_klein,
)


def _shape(spec: TinySpec) -> KleinShape:
    return read_shape(tiny_klein(spec))


def _on(strengths: dict[str, float]) -> set[str]:
    return {block for block, value in strengths.items() if value != 0.0}


def test_4b_presets_match_the_course_map() -> None:
    """4B-shaped: binding = double 0–4, texture = single 0–5, identity = single 6–13, composition = single 14–19."""
    shape = _shape(SPEC_4B_SHAPED)
    course = {
        "binding": {f"double_blocks.{i}" for i in range(0, 5)},
        "texture": {f"single_blocks.{i}" for i in range(0, 6)},
        "identity": {f"single_blocks.{i}" for i in range(6, 14)},
        "composition": {f"single_blocks.{i}" for i in range(14, 20)},
    }
    for preset, blocks in course.items():
        assert _on(block_strengths(shape, preset)) == blocks, preset
    assert _on(block_strengths(shape, "all")) == set().union(*course.values())


def test_9b_presets_are_proportional() -> None:
    """9B-shaped (8 + 24): binding = all 8 double blocks; single boundaries at 6/20 and 14/20 of 24 blocks."""
    shape = _shape(SPEC_9B_SHAPED)
    t_end, i_end = round(24 * 6 / 20), round(24 * 14 / 20)
    assert _on(block_strengths(shape, "binding")) == {f"double_blocks.{i}" for i in range(8)}
    assert _on(block_strengths(shape, "texture")) == {f"single_blocks.{i}" for i in range(0, t_end)}
    assert _on(block_strengths(shape, "identity")) == {f"single_blocks.{i}" for i in range(t_end, i_end)}
    assert _on(block_strengths(shape, "composition")) == {f"single_blocks.{i}" for i in range(i_end, 24)}


def test_group_strengths_scale_each_group() -> None:
    """Preset 'all' with per-group strengths gives each block its group's strength (negative allowed)."""
    shape = _shape(SPEC_4B_SHAPED)
    groups = {"binding": 0.5, "texture": -1.0, "identity": 0.0, "composition": 2.0}
    s = block_strengths(shape, "all", groups)
    assert s["double_blocks.3"] == 0.5 and s["single_blocks.5"] == -1.0
    assert s["single_blocks.6"] == 0.0 and s["single_blocks.19"] == 2.0
    only = block_strengths(shape, "texture", groups)
    assert _on(only) == {f"single_blocks.{i}" for i in range(6)} and set(only.values()) == {0.0, -1.0}


def test_absolute_block_indices_from_key_names() -> None:
    """A LoRA holding only some blocks gets the strengths of exactly those blocks (not positions in the file)."""
    shape = _shape(SPEC_4B_SHAPED)
    names = ["single_blocks.3.linear1", "single_blocks.15.linear2", "double_blocks.4.img_attn.qkv", "txt_in"]
    s = module_strengths(names, shape, "composition", global_strength=0.25)
    assert s == {
        "single_blocks.3.linear1": 0.0,
        "single_blocks.15.linear2": 1.0,
        "double_blocks.4.img_attn.qkv": 0.0,
        "txt_in": 0.25,
    }
    vector = [float(i) for i in range(25)]
    s = module_strengths(names, shape, "custom", block_vector=vector)
    assert s["single_blocks.3.linear1"] == 5 + 3 and s["single_blocks.15.linear2"] == 5 + 15
    assert s["double_blocks.4.img_attn.qkv"] == 4 and s["txt_in"] == 1.0


@pytest.mark.parametrize("spec", [SPEC_4B_SHAPED, SPEC_9B_SHAPED], ids=["4b", "9b"])
def test_vector_length_error_lists_expected_length_and_blocks(spec: TinySpec) -> None:
    """A vector of the wrong length is refused; the error names the needed length and every block in order."""
    shape = _shape(spec)
    n = spec.double_blocks + spec.single_blocks
    with pytest.raises(ValueError) as err:
        block_strengths(shape, "custom", block_vector=[1.0] * (n - 1))
    msg = str(err.value)
    assert f"has {n - 1} values; this model needs {n}" in msg
    order = [f"double_blocks.{i}" for i in range(spec.double_blocks)] + [
        f"single_blocks.{i}" for i in range(spec.single_blocks)
    ]
    assert ", ".join(order) in msg


def test_vector_parsing_and_preset_errors() -> None:
    """Vectors parse from commas/spaces; bad items, 'custom' without a vector, and a vector with a preset fail."""
    assert parse_block_vector(" 1, 0.5  0,-2 ") == [1.0, 0.5, 0.0, -2.0]
    assert parse_block_vector("  ") is None
    with pytest.raises(ValueError, match="item 2 is 'x'"):
        parse_block_vector("1, x")
    shape = _shape(SPEC_4B_SHAPED)
    with pytest.raises(ValueError, match="needs a per-block vector"):
        block_strengths(shape, "custom")
    with pytest.raises(ValueError, match="choose 'custom'"):
        block_strengths(shape, "texture", block_vector=[1.0] * 25)
    with pytest.raises(ValueError, match="unknown block preset"):
        block_strengths(shape, "faces")


def test_block_weighted_stack_equals_merged_per_module_deltas() -> None:
    """A preset-weighted LoRA in the stack equals merging each module's delta times its block strength."""
    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=5, context_dim=48)
    model = tiny_klein(spec)
    shape = read_shape(model)
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: LoraWeights(torch.randn(2, i, generator=gen) * i**-0.5, torch.randn(o, 2, generator=gen) * 0.05, 2.0)
        for name, (o, i) in klein_linear_shapes(shape).items()
    }
    weights = read_lora(write_kohya(weights), shape).weights
    mults = module_strengths(weights, shape, "all", {"binding": 0.5, "texture": 0.0, "composition": -1.0}, None, 2.0)
    stack = AdapterStack()
    stack.set_lora("a", weights, 0.8, module_strength=mults)
    merged = copy.deepcopy(model)
    x, sigma, ctx = torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.4]), tiny_conditioning(spec, tokens=4)
    with torch.no_grad():
        for name, w in weights.items():
            merged.get_submodule(name).weight += 0.8 * mults[name] * w.delta_weight()
        torch.testing.assert_close(
            klein_forward(model, x, sigma, ctx, adapters=stack),
            klein_forward(merged, x, sigma, ctx),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("counts", [(5, 20), (8, 24), (2, 6), (1, 3), (3, 7)])
def test_block_layout_matches_the_groups_the_weights_use(counts: tuple[int, int]) -> None:
    """The block editor's layout (names in vector order, group -> vector positions) names exactly the blocks that
    `block_groups` puts in each group, so a slider's colour is the group its value acts in."""
    from klein_lora_lab.trainer_core.model.variants import block_groups, block_layout, block_names

    double, single = counts
    shape = KleinShape(hidden=8, heads=1, double_blocks=double, single_blocks=single, context_dim=8)
    layout = block_layout(double, single)
    assert layout["names"] == block_names(shape)
    by_index = {g: [layout["names"][i] for i in idx] for g, idx in layout["groups"].items()}
    assert by_index == block_groups(shape)
    assert sorted(i for idx in layout["groups"].values() for i in idx) == list(range(double + single))


def test_variant_layouts_are_the_course_map() -> None:
    """GET /klein_lab/blocks serves the 4B map of the course (double 0–4; single 0–5, 6–13, 14–19) and the 9B one."""
    from klein_lora_lab.trainer_core.model.variants import variant_layouts

    layouts = variant_layouts()
    four = layouts["klein-4b"]["groups"]
    assert four["binding"] == list(range(5))
    assert four["texture"] == list(range(5, 11))
    assert four["identity"] == list(range(11, 19))
    assert four["composition"] == list(range(19, 25))
    assert len(layouts["klein-9b"]["names"]) == 32 and len(layouts["klein-9b"]["groups"]["binding"]) == 8
