"""Files made by diffusers + PEFT read as diffusers applies them (alpha from the `lora_adapter_metadata` header),
and our diffusers-style export loads in diffusers' own Flux2 Klein LoRA loading with the same weights."""

from __future__ import annotations

import pytest
import torch
from harness.diffusers_files import deltas_on_klein, diffusers_deltas, peft_lora_file, tiny_transformer
from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
from klein_lora_lab.trainer_core.lora.lora_formats import klein_linear_shapes, read_lora_file, write_diffusers
from klein_lora_lab.trainer_core.model.klein import KleinShape

pytest.importorskip("diffusers", reason="diffusers is the reference tool (pip install -r tests/requirements.txt)")

SHAPE = KleinShape(hidden=128, heads=1, double_blocks=2, single_blocks=3, context_dim=48)


@pytest.fixture(scope="module")
def transformer():
    return tiny_transformer(SHAPE.hidden, SHAPE.double_blocks, SHAPE.single_blocks, SHAPE.context_dim)


def _max_delta_error(read_weights: dict, want: dict[str, torch.Tensor]) -> float:
    assert sorted(read_weights) == sorted(want)
    return max((read_weights[n].delta_weight() - want[n]).abs().max().item() for n in want)


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"single_transformer_blocks.1.attn.to_out": 1.0}},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"transformer_blocks.1.attn.to_k": 2}, "use_rslora": True},
    ],
    ids=["lora_alpha", "alpha_pattern", "rank_pattern+rsLoRA"],
)
def test_peft_header_alpha_applied_as_diffusers_does(transformer, tmp_path, config) -> None:
    """A PEFT-made diffusers file whose alpha lives only in its header reads to the weight changes diffusers
    itself merges (≤ 1e-6), with per-module alpha/rank patterns and rsLoRA; header-less reading would be off."""
    path = tmp_path / "peft.safetensors"
    peft_lora_file(transformer, path, **config)
    want = deltas_on_klein(diffusers_deltas(transformer, path)[0], SHAPE.hidden)
    read = read_lora_file(path, SHAPE)
    assert read.unmatched == [] and "lora_adapter_metadata" in read.report()
    assert _max_delta_error(read.weights, want) < 1e-6
    no_header = {n: LoraWeights(w.down, w.up, float(w.rank)) for n, w in read.weights.items()}
    assert _max_delta_error(no_header, want) > 1e-3


def test_our_diffusers_export_loads_in_diffusers(transformer, tmp_path) -> None:
    """Our diffusers-style file (q/k/v split from the fused qkv, alpha folded, norm_out halves swapped) loads in
    diffusers' Flux2 Klein LoRA loading with one LoRA layer per module and the same weight changes (≤ 1e-6)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(4)
    weights = {}
    for name, (fan_out, fan_in) in sorted(klein_linear_shapes(SHAPE).items()):
        down = torch.randn(3, fan_in, generator=gen) * fan_in**-0.5
        weights[name] = LoraWeights(down, torch.randn(fan_out, 3, generator=gen) * 0.05, alpha=6.0)
    path = tmp_path / "ours_diffusers.safetensors"
    save_file(write_diffusers(weights), str(path))
    deltas, layers = diffusers_deltas(transformer, path)
    assert layers == len(deltas) == len(write_diffusers(weights)) // 2
    want = deltas_on_klein(deltas, SHAPE.hidden)
    assert _max_delta_error(weights, want) < 1e-6
