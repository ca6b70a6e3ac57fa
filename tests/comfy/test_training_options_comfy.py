"""The Training Options node in a real ComfyUI server: its choices reach run.json, the Train node reports the
memory plan, the EMA LoRA is listed and loads in core's loader, and a resume without the options node keeps
the run's options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, execution_error, train_prompt
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
    "algorithm": "lora",
    "lokr_factor": -1,
    "preservation": 0.0,
    "preservation_share": 1.0,
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


@pytest.mark.parametrize("algorithm", ["lokr", "dora"])
def test_lokr_and_dora_train_through_the_node_and_load_in_core(comfy_server, cond_file, algorithm):
    """The options node's algorithm reaches run.json and the checkpoint: a LoKr / DoRA run trains through the
    Train node with its previews, its file holds the LyCORIS / ComfyUI keys, and core's LoraLoaderModelOnly
    loads it with every key placed."""
    from safetensors import safe_open

    album = make_album(comfy_server.base_dir / "input" / f"album_{algorithm}")
    options = {**OPTIONS, "ema_decay": 0.0, "algorithm": algorithm, "lokr_factor": 4}
    prompt = _with_options(train_prompt(album, cond_file, f"algo_{algorithm}", 2), options)
    outputs = comfy_server.run_prompt(prompt, timeout_s=600)
    assert "Finished 2 steps" in outputs["6"]["text"][0]
    run_dir = runs_folder(comfy_server) / f"algo_{algorithm}"
    assert json.loads((run_dir / "run.json").read_text())["settings"]["algorithm"] == algorithm
    assert list((run_dir / "samples").glob("step_000002_*.png")), "no preview was rendered with the adapter"
    with safe_open(str(run_dir / "checkpoints" / "step_000002.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["klein_lab.algorithm"] == algorithm
    wanted = "lokr_w1" if algorithm == "lokr" else "dora_scale"
    assert any(k.endswith(wanted) for k in keys), keys[:5]
    load = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {
                "model": ["1", 0],
                "lora_name": f"algo_{algorithm}/checkpoints/step_000002.safetensors",
                "strength_model": 1.0,
            },
        },
        "3": {"class_type": "KleinLabModelInfo", "inputs": {"model": ["2", 0]}},
    }
    before = len(comfy_server.log_text())
    comfy_server.run_prompt(load)
    assert "lora key not loaded" not in comfy_server.log_text()[before:]


def _with_clip(prompt: dict, context_dim: int, preservation_class: str = "") -> dict:
    """The encode node on the test CLIP (each caption encoded with and without the trigger), not the fixed
    conditioning."""
    prompt["3"] = {"class_type": "KleinLabTestCLIPLoader", "inputs": {"context_dim": context_dim}}
    encode = prompt["5"]["inputs"]
    del encode["conditioning"]
    encode.update(clip=["3", 0], preservation_class=preservation_class)
    return prompt


def test_preservation_through_the_train_node_and_the_per_image_list(comfy_server, cond_file, tiny_spec):
    """Preservation from the options node reaches run.json and runs on every step (share 1, its loss in
    metrics.jsonl); each validation writes the album's per-image losses, which the panel's history route
    carries, the Loss Curve node lists by file name and Dataset Lint with the run adds as notes with thumbnails.
    An album encoded with the fixed conditioning (no trigger-free captions) refuses preservation on the Train
    node, saying to encode again."""
    album = make_album(comfy_server.base_dir / "input" / "album_preserve")
    options = {**OPTIONS, "memory": "auto", "ema_decay": 0.0, "preservation": 1.0, "preservation_share": 1.0}
    prompt = _with_options(train_prompt(album, cond_file, "preserve", 4, sample_every=2), options)
    outputs = comfy_server.run_prompt(_with_clip(prompt, tiny_spec.context_dim), timeout_s=600)
    assert "Finished 4 steps" in outputs["6"]["text"][0]
    run_dir = runs_folder(comfy_server) / "preserve"
    stored = json.loads((run_dir / "run.json").read_text())["settings"]
    assert (stored["preservation_weight"], stored["preservation_share"]) == (1.0, 1.0)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("preservation_loss", -1) >= 0] == [1, 2, 3, 4]
    per_image = [json.loads(line) for line in (run_dir / "per_image.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_image] == [2, 4]
    assert sorted(i["name"] for i in per_image[-1]["items"]) == ["000.png", "001.png", "002.png"]
    summary = comfy_server.get_json("/klein_lab/train/history?run=preserve")["per_image"]
    assert summary["step"] == 4 and {i["name"] for i in summary["least"] + summary["most"]} <= {
        "000.png",
        "001.png",
        "002.png",
    }

    curve = comfy_server.run_prompt(
        {
            "1": {
                "class_type": "KleinLabLossCurve",
                "inputs": {"run": "preserve", "width": 400, "height": 200, "smoothing": 0.9},
            }
        }
    )
    listed = curve["1"]["text"][0]
    assert "per-image loss at step 4" in listed and "least learned: 0" in listed and "most learned: 0" in listed
    lint_inputs = {"folder": str(album), "pairs_folder": "", "trigger": "TOK", "preset": "style", "resolution": 32}
    lint = comfy_server.run_prompt(
        {
            "1": {"class_type": "KleinLabDatasetLint", "inputs": {**lint_inputs, "run": "preserve"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
        }
    )
    assert "the run learned these least by step 4" in lint["1"]["text"][0]
    assert lint["2"]["images"], lint

    fixed = _with_options(train_prompt(album, cond_file, "preserve_fixed", 2, sample_every=0), options)
    error = execution_error(comfy_server, fixed)
    assert "Klein Encode Dataset" in error["exception_message"], error
    assert not (runs_folder(comfy_server) / "preserve_fixed").exists()
