"""Save LoRA as…: baking scales and block weights is exact, SVD resizing is the best rank-r approximation with its
energy reported, and the header carries what LoRA managers read."""

from __future__ import annotations

import torch
from klein_lora_lab.trainer_core.lora.adapter_math import DenseAdapter, FilePart
from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
from klein_lora_lab.trainer_core.lora.export import BakeSource, bake, export_metadata, export_state_dict, to_lora
from klein_lora_lab.trainer_core.lora.lora_formats import read_lora
from klein_lora_lab.trainer_core.model.klein import KleinShape

SHAPE = KleinShape(hidden=128, heads=1, double_blocks=2, single_blocks=3, context_dim=48)
QKV, PROJ = "double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.proj"


def _lora(out: int, inp: int, rank: int, seed: int, alpha: float) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    return LoraWeights(torch.randn(rank, inp, generator=gen) * 0.1, torch.randn(out, rank, generator=gen), alpha)


def _sources() -> list[BakeSource]:
    a = {QKV: _lora(384, 128, 4, 1, 8.0), PROJ: _lora(128, 128, 4, 2, 2.0)}
    b = {QKV: _lora(384, 128, 8, 3, 8.0)}
    gen = torch.Generator().manual_seed(4)
    lokr = {"lokr_w1": torch.randn(8, 8, generator=gen), "lokr_w2": torch.randn(16, 16, generator=gen) * 0.01}
    c = {PROJ: DenseAdapter((FilePart("x", "lokr", lokr, None, (0, 128)),), 128, 128)}
    return [
        BakeSource("a", a, 0.8, {QKV: 0.5, PROJ: 1.0}),
        BakeSource("b", b, -1.5),
        BakeSource("c", c, 0.6),
    ]


def _want() -> dict[str, torch.Tensor]:
    (a, b, c) = _sources()
    return {
        QKV: 0.4 * a.weights[QKV].delta_weight() - 1.5 * b.weights[QKV].delta_weight(),
        PROJ: 0.8 * a.weights[PROJ].delta_weight() + 0.6 * c.weights[PROJ].delta(),
    }


def test_bake_and_full_rank_are_exact() -> None:
    """Baked ΔW = Σ strength · block weight · ΔW per module; rank 0 keeps a plain-LoRA module as the exact
    concatenation (rank 4 + 8) and writes a module with a LoKr source at its numerical rank, exactly."""
    resized = to_lora(bake(_sources()), rank=0)
    want = _want()
    assert resized.weights[QKV].rank == 12
    for name, delta in want.items():
        torch.testing.assert_close(resized.weights[name].delta_weight(), delta, rtol=1e-4, atol=1e-5)
    assert resized.overall > 0.999999 and resized.lowest > 0.999999


def test_resize_is_the_best_rank_r_approximation_and_reports_energy() -> None:
    """At rank 3 each module is its truncated SVD: the error's squared norm is (1 − energy kept) of ΔW's, equal to
    the tail of the dense singular values; the report shows the energy."""
    resized = to_lora(bake(_sources()), rank=3)
    for name, delta in _want().items():
        s = torch.linalg.svdvals(delta)
        tail = float((s[3:] ** 2).sum() / (s**2).sum())
        err = float(((resized.weights[name].delta_weight() - delta) ** 2).sum() / (delta**2).sum())
        assert resized.weights[name].rank == 3
        assert abs(resized.energy[name] - (1 - tail)) < 1e-4 and abs(err - tail) < 1e-4
    assert 0 < resized.overall < 1 and "energy kept" in resized.report()


def test_exported_styles_read_back_and_header() -> None:
    """Each style's tensors read back to the same ΔW; the header has the base model, trigger, rank, alpha, the
    carried run settings, a modelspec block and ss_ keys."""
    resized = to_lora(bake(_sources()), rank=4)
    for fmt in ("ComfyUI", "diffusers", "kohya"):
        read = read_lora(export_state_dict(resized.weights, fmt), SHAPE)
        assert read.unmatched == []
        for name, w in resized.weights.items():
            torch.testing.assert_close(read.weights[name].delta_weight(), w.delta_weight(), rtol=1e-5, atol=1e-6)
    meta = export_metadata(
        variant="klein-4b",
        title="tok_style",
        trigger="TOKSTYLE",
        resized=resized,
        sources=["a @ 0.8"],
        source_metadata={"klein_lab.step": "500", "klein_lab.settings": "{}", "other": "x"},
    )
    assert meta["modelspec.architecture"] == "flux-2-klein-4b/lora" and meta["modelspec.trigger_phrase"] == "TOKSTYLE"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4" and meta["ss_steps"] == "500"
    assert meta["klein_lab.step"] == "500" and "other" not in meta and float(meta["klein_lab.energy_kept"]) < 1
