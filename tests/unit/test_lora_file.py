"""Unit tests of our LoRA file: exact round trip, key names ComfyUI reads, metadata, atomic and NaN-safe writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
from klein_lora_lab.trainer_core.lora.lora_file import load_lora, save_lora
from safetensors import safe_open
from safetensors.torch import save_file


def _weights(seed: int = 0, rank: int = 4, alpha: float = 2.0) -> dict[str, LoraWeights]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"double_blocks.0.img_attn.qkv": (128, 384), "single_blocks.3.linear2": (512, 128)}
    return {
        name: LoraWeights(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha)
        for name, (i, o) in shapes.items()
    }


def test_round_trip_is_exact_with_metadata(tmp_path: Path) -> None:
    """fp32 weights, alpha and every metadata entry come back unchanged; ss_network_* are filled in."""
    weights = _weights()
    path = tmp_path / "lora.safetensors"
    save_lora(path, weights, {"klein_lab.step": "40", "klein_lab.trigger": "TOK"})
    loaded, meta = load_lora(path)
    assert set(loaded) == set(weights)
    for name, w in weights.items():
        assert torch.equal(loaded[name].down, w.down) and torch.equal(loaded[name].up, w.up)
        assert loaded[name].alpha == w.alpha
    assert meta["klein_lab.step"] == "40" and meta["klein_lab.trigger"] == "TOK"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["klein_lab.format"]) == (
        "4",
        "2",
        "klein_lab.lora.v1",
    )


def test_key_names_are_the_ones_comfyui_loads(tmp_path: Path) -> None:
    """Keys are diffusion_model.<module>.lora_A.weight [rank, in], .lora_B.weight [out, rank], .alpha (scalar)."""
    path = tmp_path / "lora.safetensors"
    save_lora(path, _weights(), {}, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight")
        b = f.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight")
        alpha = f.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.alpha")
    assert keys == {
        f"diffusion_model.{m}.{s}"
        for m in ("double_blocks.0.img_attn.qkv", "single_blocks.3.linear2")
        for s in ("lora_A.weight", "lora_B.weight", "alpha")
    }
    assert a.shape == (4, 128) and b.shape == (384, 4) and a.dtype == torch.bfloat16
    assert alpha.ndim == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0


def test_nan_weights_are_never_written(tmp_path: Path) -> None:
    """A LoRA holding NaN is refused and no file (or temporary file) is left behind."""
    weights = _weights()
    weights["single_blocks.3.linear2"].up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_lora(tmp_path / "bad.safetensors", weights, {})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the final rename fails, the previous file is intact and the temporary file is removed."""
    path = tmp_path / "lora.safetensors"
    save_lora(path, _weights(seed=1), {"klein_lab.step": "1"})
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, _weights(seed=2), {"klein_lab.step": "2"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_foreign_keys_and_bad_metadata_are_rejected(tmp_path: Path) -> None:
    """load_lora reads only our format (other styles: lora_formats); metadata values must be strings."""
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 8)}, str(path))
    with pytest.raises(ValueError, match="lora_unet_single_blocks_0_linear1"):
        load_lora(path)
    with pytest.raises(TypeError, match="klein_lab.step"):
        save_lora(tmp_path / "x.safetensors", _weights(), {"klein_lab.step": 3})  # type: ignore[dict-item]


def test_missing_alpha_means_scale_one(tmp_path: Path) -> None:
    """Without an .alpha tensor ComfyUI scales by 1, so we read alpha = rank."""
    path = tmp_path / "noalpha.safetensors"
    save_file(
        {
            "diffusion_model.img_in.lora_A.weight": torch.zeros(3, 128),
            "diffusion_model.img_in.lora_B.weight": torch.zeros(64, 3),
        },
        str(path),
    )
    weights, _ = load_lora(path)
    assert weights["img_in"].alpha == 3.0 and weights["img_in"].scale == 1.0
