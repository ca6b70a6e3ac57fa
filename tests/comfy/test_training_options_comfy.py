"""The Training Options node in a real ComfyUI server: its choices reach run.json, the Train node reports the
memory plan, the EMA LoRA is listed and loads in core's loader, and a resume without the options node keeps
the run's options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, train_prompt
from harness.server import TINY_MODEL_NAME
from PIL import Image

EMA_NAME = "opts/checkpoints/step_000002.ema.safetensors"
OPTIONS = {
    "memory": "least memory",
    "recompute_share": 0.5,
    "optimizer": "adamw",
    "lr_schedule": "cosine",
    "warmup_steps": 1,
    "grad_accum": 2,
    "caption_dropout": 0.0,
    "sigma_sampling": "flux2_shift",
    "ema_decay": 0.9,
    "save_dtype": "fp32",
    "compile": "off",
    "compute": "fp8",
}


@pytest.fixture(scope="module")
def cond_file(tiny_spec) -> Path:
    return tiny_conditioning_path(tiny_spec, tokens=8)


def make_album(folder: Path) -> Path:
    """Three coloured squares with captions (pixels no other test album shares)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (SIZE, SIZE), (70 * i, 30, 200 - 60 * i)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"an options test square {i}")
    return folder


def runs_folder(server) -> Path:
    return server.base_dir / "output" / "klein_lora_lab" / "runs"


def _with_options(prompt: dict, options: dict) -> dict:
    prompt["9"] = {"class_type": "KleinLabTrainingOptions", "inputs": dict(options)}
    prompt["6"]["inputs"]["options"] = ["9", 0]
    return prompt


def test_options_node_schema_has_tooltips_and_ranges(comfy_server):
    """Every input of the options node has a tooltip; every number has min and max (the team's rule)."""
    info = comfy_server.get_json("/object_info/KleinLabTrainingOptions")["KleinLabTrainingOptions"]
    assert info["output"] == ["KLEIN_TRAINING_OPTIONS"]
    inputs = info["input"]["required"]
    assert set(inputs) == set(OPTIONS)
    for name, (kind, spec) in inputs.items():
        assert spec.get("tooltip"), name
        if kind in ("INT", "FLOAT"):
            assert "min" in spec and "max" in spec, name
    train = comfy_server.get_json("/object_info/KleinLabTrainLora")["KleinLabTrainLora"]["input"]["optional"]
    assert train["options"][0] == "KLEIN_TRAINING_OPTIONS"


def test_options_are_stored_reported_and_kept_on_resume(comfy_server, cond_file):
    """The options land in run.json, the node's text names the memory choice, each checkpoint has an EMA LoRA
    beside it that core's loader lists and loads with every key; a resume without the options node keeps them."""
    album = make_album(comfy_server.base_dir / "input" / "album_options")
    prompt = _with_options(train_prompt(album, cond_file, "opts", 2, sample_every=0), OPTIONS)
    outputs = comfy_server.run_prompt(prompt, timeout_s=600)
    text = outputs["6"]["text"][0]
    assert "Finished 2 steps" in text and "memory least memory: every block recomputed" in text, text
    assert "fp8 compute needs an NVIDIA GPU" in text and "computing in bf16" in text, text  # CPU: bf16, said
    run_dir = runs_folder(comfy_server) / "opts"
    stored = json.loads((run_dir / "run.json").read_text())["settings"]
    expected = {
        "memory_mode": "least_memory",
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "grad_accum": 2,
        "timestep_sampling": "flux2_shift",
        "ema_decay": 0.9,
        "save_dtype": "fp32",
        "compile_blocks": "off",
        "compute": "fp8",
    }
    assert {k: stored[k] for k in expected} == expected
    assert (run_dir / "checkpoints" / "step_000002.ema.safetensors").is_file()

    listed = comfy_server.get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert EMA_NAME in listed["lora_name"][0]
    load = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {
                "model": ["1", 0],
                "lora_name": "opts/checkpoints/step_000002.ema.safetensors",
                "strength_model": 1.0,
            },
        },
        "3": {"class_type": "KleinLabModelInfo", "inputs": {"model": ["2", 0]}},
    }
    before = len(comfy_server.log_text())
    comfy_server.run_prompt(load)
    assert "lora key not loaded" not in comfy_server.log_text()[before:]

    resumed = comfy_server.run_prompt(
        train_prompt(album, cond_file, "opts", 4, resume=True, sample_every=0), timeout_s=600
    )
    assert "Finished 4 steps" in resumed["6"]["text"][0]
    stored = json.loads((run_dir / "run.json").read_text())["settings"]
    assert {k: stored[k] for k in expected} == expected
    assert (run_dir / "checkpoints" / "step_000004.ema.safetensors").is_file()
