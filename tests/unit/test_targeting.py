"""Unit tests of target resolution: every spec form against a Klein-shaped model, and the errors."""

from __future__ import annotations

import pytest
import torch
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import SPEC_4B_SHAPED, TinySpec, tiny_klein

MODEL_4B = tiny_klein(SPEC_4B_SHAPED)  # 5 double + 20 single blocks, hidden 128


def _blocks(names: list[str]) -> set[str]:
    return {".".join(n.split(".")[:2]) for n in names}


def test_attention_covers_every_block() -> None:
    """'attention': q/k/v + out projections of both streams in double blocks, linear1/linear2 in single blocks."""
    targets = resolve_targets(MODEL_4B, "attention")
    assert len(targets) == 5 * 4 + 20 * 2
    assert targets["double_blocks.0.img_attn.qkv"] == (128, 384)
    assert targets["single_blocks.19.linear2"] == (512, 128)
    assert not any("mlp" in n for n in targets)
    assert _blocks(list(targets)) == {f"double_blocks.{i}" for i in range(5)} | {
        f"single_blocks.{i}" for i in range(20)
    }


def test_all_linear_adds_the_mlps_but_nothing_outside_blocks() -> None:
    """'all_linear': every Linear inside blocks (8 per double block, 2 per single block), no global layer."""
    targets = resolve_targets(MODEL_4B, "all_linear")
    assert len(targets) == 5 * 8 + 20 * 2
    assert "double_blocks.4.txt_mlp.2" in targets
    assert not any(n.startswith(("img_in", "txt_in", "final_layer", "time_in")) for n in targets)


def test_groups_follow_the_course_block_map() -> None:
    """Group names select the course's blocks from the real counts: binding = double 0-4, identity = single 6-13."""
    binding_identity = resolve_targets(MODEL_4B, "binding,identity")
    assert _blocks(list(binding_identity)) == {f"double_blocks.{i}" for i in range(5)} | {
        f"single_blocks.{i}" for i in range(6, 14)
    }
    texture_all = resolve_targets(MODEL_4B, "all_linear@texture")
    assert _blocks(list(texture_all)) == {f"single_blocks.{i}" for i in range(6)}
    assert len(resolve_targets(MODEL_4B, "attention@binding")) == 20


def test_explicit_blocks_and_ranges() -> None:
    """'blocks:double.0,double.3,single.5-9' selects exactly those blocks (ranges inclusive)."""
    targets = resolve_targets(MODEL_4B, "blocks:double.0,double.3,single.5-9")
    assert _blocks(list(targets)) == {"double_blocks.0", "double_blocks.3"} | {
        f"single_blocks.{i}" for i in range(5, 10)
    }


def test_regex_can_reach_any_linear() -> None:
    """'regex:' full-matches module names anywhere in the model, e.g. the output layer."""
    targets = resolve_targets(MODEL_4B, r"regex:final_layer\.linear|single_blocks\.1\d\.linear1")
    assert set(targets) == {"final_layer.linear"} | {f"single_blocks.{i}.linear1" for i in range(10, 20)}


def test_results_follow_model_order() -> None:
    """Names come back in the model's module order (stable file layout, stable optimizer order)."""
    names = list(resolve_targets(MODEL_4B, "all_linear"))
    order = [n for n, _ in MODEL_4B.named_modules() if n in set(names)]
    assert names == order


def test_nothing_matched_lists_what_exists() -> None:
    """A spec that selects nothing fails and the message lists the model's blocks, groups and Linear names."""
    with pytest.raises(ValueError) as err:
        resolve_targets(MODEL_4B, "regex:.*to_q")
    message = str(err.value)
    assert "regex:.*to_q" in message
    assert "5 double and 20 single blocks" in message
    assert "single_blocks.N.linear1" in message and "binding" in message


def test_blocks_out_of_range_name_the_real_counts() -> None:
    """An explicit block past the end names the model's real block ranges."""
    with pytest.raises(ValueError, match=r"single\.25 does not exist.*single\.0-19"):
        resolve_targets(MODEL_4B, "blocks:single.20-25")


def test_only_linear_modules_with_2d_weights() -> None:
    """Norm modules (RMSNorm scales) never become targets, even when a regex matches them."""
    model = tiny_klein(TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16))
    with pytest.raises(ValueError, match="matches no Linear"):
        resolve_targets(model, r"regex:.*norm.*")
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in resolve_targets(model, "regex:.*"))
