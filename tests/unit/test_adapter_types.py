"""LoKr, LoHa, DoRA and .diff files read into dense adapters whose ΔW equals what the tool that made them applies.

Files are made by LyCORIS itself (its forward is the reference) and written under LyCORIS', ai-toolkit's and
musubi-tuner's key rules; stacks apply them at forward time with strengths and block weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from harness.adapter_files import KEY_STYLES, LYCORIS_KINDS, lycoris_file, restyle
from klein_lora_lab.trainer_core.lora.adapter_math import DenseAdapter, place
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack, DenseDelta, LoraWeights
from klein_lora_lab.trainer_core.lora.lora_formats import LoraFormatError, read_lora
from klein_lora_lab.trainer_core.model.klein import klein_forward, read_shape
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein

pytest.importorskip("lycoris", reason="lycoris-lora makes the LyCORIS files (pip install -r tests/requirements.txt)")

SPEC = TinySpec(hidden=128, double_blocks=2, single_blocks=3, context_dim=48)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.6]), tiny_conditioning(SPEC, tokens=5)


def _merged_forward(base: torch.nn.Module, weights: dict, strength: float = 1.0) -> torch.Tensor:
    """The base model with every adapter's ΔW (· strength) added to its weight: the merged reference of ours."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, adapter in weights.items():
            w = model.get_submodule(name).weight
            w += strength * place(adapter, "cpu", torch.float32, w.clone()).delta_weight()
        return klein_forward(model, *_inputs())


_MADE: dict[str, tuple] = {}


def _made(kind: str):
    """The LyCORIS file of `kind` and LyCORIS' own outputs (made once per kind for this module)."""
    if kind not in _MADE:
        torch.manual_seed(0)
        made = lycoris_file(tiny_klein(SPEC), kind)
        with torch.no_grad():
            _MADE[kind] = (made, klein_forward(made.wrapped, *_inputs()), klein_forward(made.base, *_inputs()))
    return _MADE[kind]


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
@pytest.mark.parametrize("style", KEY_STYLES)
def test_lycoris_files_equal_lycoris_own_forward(kind: str, style: str) -> None:
    """A LyCORIS-made file of each kind, under each tool's key rule, gives the output LyCORIS' own wrapped model
    gives (≤ 1e-5), and changes the output clearly."""
    made, want, base = _made(kind)
    read = read_lora(restyle(made.state_dict, made.base, style), read_shape(made.base))
    assert read.unmatched == []
    assert all(isinstance(a, DenseAdapter) for a in read.weights.values())
    got = _merged_forward(made.base, read.weights)
    assert (want - base).abs().max() > 1e-2
    assert (got - want).abs().max() < 1e-5


def test_dense_adapters_in_a_stack_with_strengths_and_block_weights() -> None:
    """In an AdapterStack a dense ΔW is applied at forward time like a LoRA: strength and per-module weights
    multiply it, and a LoRA plus a LoKr on the same module fuse into one dense delta equal to their sum."""
    made = _made("LoKr")[0]
    read = read_lora(made.state_dict, read_shape(made.base))
    name = "double_blocks.0.img_attn.qkv"
    delta = place(read.weights[name], "cpu", torch.float32)
    assert isinstance(delta, DenseDelta)
    gen = torch.Generator().manual_seed(2)
    lora = LoraWeights(torch.randn(3, 128, generator=gen), torch.randn(384, 3, generator=gen) * 0.1, alpha=6.0)
    stack = AdapterStack()
    stack.set_lora("lokr", {name: delta}, strength=0.7, module_strength={name: 0.5})
    stack.set_lora("lora", {name: lora}, strength=-1.2)
    x = torch.randn(2, 5, 128, generator=gen)
    y = torch.randn(2, 5, 384, generator=gen)
    want = y + x @ (0.35 * delta.delta_weight() - 1.2 * lora.delta_weight()).t()
    torch.testing.assert_close(stack.apply(name, x, y), want, rtol=1e-5, atol=1e-5)
    down, up, scale = stack.fused(name)
    assert down is None and up.shape == (384, 128)
    torch.testing.assert_close(y + scale * x @ up.t(), want, rtol=1e-5, atol=1e-5)


def test_diff_patches_and_unsupported_types() -> None:
    """A full `.diff` on a Linear is its ΔW; `.diff` on a norm and `.diff_b` (Klein's Linears have no bias) are
    reported as not loaded; OFT is refused with a message naming it and core's loader."""
    shape = read_shape(tiny_klein(SPEC))
    diff = torch.randn(128, 128) * 0.01
    sd = {
        "diffusion_model.double_blocks.0.img_attn.proj.diff": diff,
        "diffusion_model.double_blocks.0.img_attn.proj.diff_b": torch.zeros(128),
        "diffusion_model.double_blocks.0.img_attn.norm.key_norm.diff": torch.zeros(128),
    }
    read = read_lora(sd, shape)
    torch.testing.assert_close(read.weights["double_blocks.0.img_attn.proj"].delta(), diff)
    assert read.unmatched == sorted(k for k in sd if not k.endswith("proj.diff"))
    with pytest.raises(LoraFormatError, match=r"OFT.*core's 'Load LoRA'"):
        read_lora({"lora_unet_double_blocks_0_img_attn_qkv.oft_blocks": torch.zeros(2, 2, 2)}, shape)


def test_half_a_lokr_is_reported_not_guessed() -> None:
    """A LoKr module missing its second factor is listed as not loaded (never applied half-built)."""
    made = _made("LoKr")[0]
    sd = {k: v for k, v in made.state_dict.items() if not k.startswith("lycoris_double_blocks_0_img_attn_qkv.lokr_w2")}
    read = read_lora(sd, read_shape(made.base))
    assert "double_blocks.0.img_attn.qkv" not in read.weights
    assert "lycoris_double_blocks_0_img_attn_qkv.lokr_w1" in read.unmatched
