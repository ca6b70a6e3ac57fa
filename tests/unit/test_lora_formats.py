"""Reading every Klein LoRA key style into canonical form, refusing foreign LoRAs, reporting unmatched keys."""

from __future__ import annotations

import copy

import pytest
import torch
from klein_lora_lab.trainer_core.lora.adapters import AdapterStack, LoraWeights
from klein_lora_lab.trainer_core.lora.lora_formats import (
    LoraFormatError,
    klein_linear_shapes,
    read_lora,
    read_lora_file,
    write_diffusers,
    write_kohya,
    write_peft,
)
from klein_lora_lab.trainer_core.model.klein import KleinShape, klein_forward, read_shape
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein

SPEC = TinySpec(hidden=128, double_blocks=2, single_blocks=3, context_dim=48)


def _shape(spec: TinySpec = SPEC) -> KleinShape:
    return read_shape(tiny_klein(spec))


def _random_lora(shape: KleinShape, seed: int = 0, names: list[str] | None = None) -> dict[str, LoraWeights]:
    """A LoRA over every Linear (or `names`), with ranks and alphas varying per module so scales matter."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (fan_out, fan_in)) in enumerate(sorted(klein_linear_shapes(shape).items())):
        if names is not None and name not in names:
            continue
        rank = 2 + i % 3
        down = torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5
        up = torch.randn(fan_out, rank, generator=gen) * 0.05
        out[name] = LoraWeights(down, up, alpha=float(rank) * (0.5 + (i % 4) * 0.5))
    return out


def _assert_same_deltas(got: dict[str, LoraWeights], want: dict[str, LoraWeights]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name].delta_weight(), want[name].delta_weight(), rtol=1e-5, atol=1e-6)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.6]), tiny_conditioning(SPEC, tokens=5)


WRITERS = {
    "ours": (write_peft, "native"),
    "native lora_down/up": (lambda w: write_peft(w, down_up=True), "native"),
    "native without alpha": (lambda w: write_peft(w, with_alpha=False), "native"),
    "kohya": (write_kohya, "kohya"),
    "diffusers": (write_diffusers, "diffusers"),
}


@pytest.mark.parametrize("style", sorted(WRITERS))
def test_round_trip_each_style(style: str) -> None:
    """Write in style S -> read -> the same dense delta per module, nothing unmatched, the style detected."""
    shape = _shape()
    weights = _random_lora(shape)
    writer, detected = WRITERS[style]
    read = read_lora(writer(weights), shape)
    assert read.unmatched == []
    assert read.source_format == detected
    _assert_same_deltas(read.weights, weights)


@pytest.mark.parametrize("style", ["ours", "kohya", "diffusers"])
def test_round_trip_keeps_rank_and_alpha(style: str) -> None:
    """ours/kohya keep tensors and alpha exactly; diffusers' split qkv collapses back to the original rank."""
    shape = _shape()
    weights = _random_lora(shape)
    read = read_lora(WRITERS[style][0](weights), shape).weights
    for name, w in weights.items():
        assert read[name].rank == w.rank, name
        if style != "diffusers":
            assert torch.equal(read[name].down, w.down) and torch.equal(read[name].up, w.up)
            assert read[name].alpha == w.alpha


@pytest.mark.parametrize("style", sorted(WRITERS))
def test_stack_output_equals_merged_weights(style: str) -> None:
    """The model with the read LoRA in an AdapterStack equals the model with the dense delta merged into W."""
    model = tiny_klein(SPEC)
    shape = read_shape(model)
    weights = _random_lora(shape, seed=1)
    read = read_lora(WRITERS[style][0](weights), shape).weights
    strength = -1.5
    stack = AdapterStack()
    stack.set_lora("a", read, strength)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            merged.get_submodule(name).weight += strength * w.delta_weight()
        x, sigma, ctx = _inputs()
        got = klein_forward(model, x, sigma, ctx, adapters=stack)
        want = klein_forward(merged, x, sigma, ctx)
        assert not torch.allclose(want, klein_forward(model, x, sigma, ctx), atol=1e-3)  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_diffusers_independent_qkv_parts_are_fused_exactly() -> None:
    """Separate q/k/v LoRAs (own downs, ranks, alphas; one part missing) become one exact fused-qkv LoRA."""
    shape = _shape()
    h = shape.hidden
    gen = torch.Generator().manual_seed(2)
    sd, want = {}, torch.zeros(3 * h, h)
    for k, (part, rank, alpha) in enumerate([("to_q", 2, 1.0), ("to_k", 3, 6.0), ("to_v", 4, None)]):
        if part == "to_k":
            continue  # a LoRA without the k part: those rows stay untouched
        down, up = torch.randn(rank, h, generator=gen), torch.randn(h, rank, generator=gen)
        sd[f"transformer.transformer_blocks.1.attn.{part}.lora_A.weight"] = down
        sd[f"transformer.transformer_blocks.1.attn.{part}.lora_B.weight"] = up
        if alpha is not None:
            sd[f"transformer.transformer_blocks.1.attn.{part}.alpha"] = torch.tensor(alpha)
        want[k * h : (k + 1) * h] = up @ down * ((alpha or rank) / rank)
    read = read_lora(sd, shape)
    assert list(read.weights) == ["double_blocks.1.img_attn.qkv"]
    torch.testing.assert_close(read.weights["double_blocks.1.img_attn.qkv"].delta_weight(), want)


def test_underscored_diffusers_and_norm_out_swap() -> None:
    """OneTrainer/LyCORIS (and lora_unet_) underscored diffusers names resolve; norm_out.linear rows are swapped
    to (shift, scale)."""
    shape = _shape()
    h = shape.hidden
    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, h, generator=gen), torch.randn(2 * h, 2, generator=gen)
    sd = {
        "lora_transformer_norm_out_linear.lora_down.weight": down,
        "lora_transformer_norm_out_linear.lora_up.weight": up,
        "lycoris_single_transformer_blocks_2_attn_to_qkv_mlp_proj.lora_down.weight": torch.randn(2, h),
        "lycoris_single_transformer_blocks_2_attn_to_qkv_mlp_proj.lora_up.weight": torch.randn(9 * h, 2),
        "lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_down.weight": torch.randn(2, h),
        "lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_up.weight": torch.randn(h, 2),
        "lora_unet_transformer_blocks_1_ff_context_linear_out.lora_down.weight": torch.randn(2, 3 * h),
        "lora_unet_transformer_blocks_1_ff_context_linear_out.lora_up.weight": torch.randn(h, 2),
    }
    read = read_lora(sd, shape)
    assert sorted(read.weights) == [
        "double_blocks.0.txt_attn.qkv",
        "double_blocks.1.txt_mlp.2",
        "final_layer.adaLN_modulation.1",
        "single_blocks.2.linear1",
    ]
    delta = read.weights["final_layer.adaLN_modulation.1"].delta_weight()
    torch.testing.assert_close(delta, torch.cat([(up @ down)[h:], (up @ down)[:h]]))
    qkv = read.weights["double_blocks.0.txt_attn.qkv"].delta_weight()
    assert qkv[:h].abs().max() == 0 and qkv[2 * h :].abs().max() == 0 and qkv[h : 2 * h].abs().max() > 0


def test_linear1_qkv_key_lands_on_first_rows() -> None:
    """ComfyUI's `single_blocks.i.linear1_qkv` key writes only the q/k/v rows (0..3h) of linear1."""
    shape = _shape()
    h = shape.hidden
    down, up = torch.randn(2, h), torch.randn(3 * h, 2)
    sd = {"diffusion_model.single_blocks.0.linear1_qkv.lora_A.weight": down}
    sd["diffusion_model.single_blocks.0.linear1_qkv.lora_B.weight"] = up
    delta = read_lora(sd, shape).weights["single_blocks.0.linear1"].delta_weight()
    torch.testing.assert_close(delta[: 3 * h], up @ down)
    assert delta[3 * h :].abs().max() == 0


def test_unmatched_keys_are_reported_not_dropped() -> None:
    """Keys that fit no module (unknown module, text encoder, half a pair, non-LoRA) are listed in `unmatched`."""
    shape = _shape()
    weights = _random_lora(shape, names=["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"])
    sd = write_peft(weights)
    extra = {
        "diffusion_model.double_blocks.0.img_attn.norm.query_norm.lora_A.weight": torch.zeros(2, 128),
        "diffusion_model.double_blocks.0.img_attn.norm.query_norm.lora_B.weight": torch.zeros(128, 2),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
        "diffusion_model.txt_in.lora_A.weight": torch.zeros(2, 48),
        "diffusion_model.img_in.diff_b": torch.zeros(128),
    }
    read = read_lora({**sd, **extra}, shape)
    _assert_same_deltas(read.weights, weights)
    assert sorted(read.unmatched) == sorted(extra)
    assert f"{len(extra)} keys NOT loaded" in read.report()


def test_refuses_flux1_lora() -> None:
    """A FLUX.1 LoRA (per-block img_mod modulation) is refused with a message naming FLUX.1."""
    sd = write_kohya(_random_lora(_shape(), names=["double_blocks.0.img_attn.qkv"]))
    sd["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = torch.zeros(2, 128)
    sd["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"] = torch.zeros(6 * 128, 2)
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        read_lora(sd, _shape())


def test_refuses_flux1_attention_only_lora_by_block_count() -> None:
    """An attention-only FLUX.1 LoRA (no FLUX.1-only module) is refused by its block indices: 19 + 38 blocks."""
    shape = KleinShape(hidden=128, heads=1, double_blocks=5, single_blocks=20, context_dim=48)
    sd = {}
    for name, out_f in (("double_blocks.18.img_attn.qkv", 384), ("single_blocks.37.linear1", 128 * 9)):
        sd[f"diffusion_model.{name}.lora_A.weight"] = torch.zeros(2, 128)
        sd[f"diffusion_model.{name}.lora_B.weight"] = torch.zeros(out_f, 2)
    with pytest.raises(LoraFormatError, match=r"FLUX\.1 \(19 double \+ 38 single"):
        read_lora(sd, shape)


def test_refuses_sdxl_lora() -> None:
    """An SD/SDXL UNet LoRA is refused naming Stable Diffusion / SDXL."""
    sd = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 2),
    }
    with pytest.raises(LoraFormatError, match="SDXL"):
        read_lora(sd, _shape())


def test_refuses_9b_lora_on_4b_by_hidden_size() -> None:
    """A 9B LoRA on a 4B model: the message says hidden 4096 (9B) vs the model's hidden 3072 (4B)."""
    shape_4b = KleinShape(hidden=3072, heads=24, double_blocks=5, single_blocks=20, context_dim=7680)
    sd = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(1, 4096),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(3 * 4096, 1),
    }
    msg = r"made for a Klein with hidden 4096 \(9B\); the loaded model is hidden 3072 \(4B\)"
    with pytest.raises(LoraFormatError, match=msg):
        read_lora(sd, shape_4b)


def test_refuses_9b_shaped_lora_on_4b_shaped_model_by_blocks() -> None:
    """Same hidden, more blocks (9B layout on a 4B-shaped model): the message names the blocks and Klein 9B."""
    from klein_lora_lab.trainer_core.model.tiny import SPEC_4B_SHAPED, SPEC_9B_SHAPED

    weights = _random_lora(_shape(SPEC_9B_SHAPED), names=["double_blocks.7.txt_attn.proj", "single_blocks.23.linear2"])
    with pytest.raises(LoraFormatError, match=r"double_blocks\.7 / single_blocks\.23.*Klein 9B \(8 double \+ 24"):
        read_lora(write_peft(weights), _shape(SPEC_4B_SHAPED))


def test_refuses_unsupported_lycoris_variants() -> None:
    """OFT, BOFT and GLoRA files (types the pack does not read) get a clear error naming the type."""
    for key, kind in (("oft_blocks", "OFT"), ("boft_R", "BOFT"), ("a1.weight", "GLoRA")):
        sd = {f"lora_unet_double_blocks_0_img_attn_qkv.{key}": torch.zeros(2, 2)}
        with pytest.raises(LoraFormatError, match=f"{kind}.*use core's 'Load LoRA'"):
            read_lora(sd, _shape())


def test_refuses_file_without_any_klein_key(tmp_path) -> None:
    """A file whose keys match no Klein module is refused (never an empty LoRA), and the error names the file."""
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"foo.bar.lora_A.weight": torch.zeros(2, 4), "foo.bar.lora_B.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(LoraFormatError, match=r"other\.safetensors: no key"):
        read_lora_file(path, _shape())


def test_wrong_context_dim_names_the_module() -> None:
    """A dim mismatch outside the hidden size (txt_in's context) names the module and both shapes."""
    sd = {
        "diffusion_model.txt_in.lora_A.weight": torch.zeros(2, 99),
        "diffusion_model.txt_in.lora_B.weight": torch.zeros(128, 2),
    }
    with pytest.raises(LoraFormatError, match=r"'diffusion_model\.txt_in'.*in 99.*in 48"):
        read_lora(sd, _shape())


def test_reads_files_written_by_the_trainer(tmp_path) -> None:
    """A checkpoint saved by lora_file.save_lora (bf16, with metadata) reads back as the same weights, as 'native'."""
    from klein_lora_lab.trainer_core.lora.lora_file import save_lora

    shape = _shape()
    weights = {k: LoraWeights(w.down.bfloat16(), w.up.bfloat16(), w.alpha) for k, w in _random_lora(shape).items()}
    path = tmp_path / "step_000100.safetensors"
    save_lora(path, weights, {"klein_lab.step": "100"})
    read = read_lora_file(path, shape)
    assert read.unmatched == [] and read.source_format == "native"
    for name, w in weights.items():
        assert torch.equal(read.weights[name].down, w.down) and torch.equal(read.weights[name].up, w.up)
        assert read.weights[name].alpha == w.alpha
