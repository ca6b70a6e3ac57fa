"""API-format prompts the comfy-tier tests queue on the test server, and the helpers that send them.

`train_prompt` is the one training graph (tiny Klein + random VAE + test conditioning -> dataset -> encode ->
train -> preview); tests change what they need on the returned dict (a fault-injection node, other widgets).
"""

from __future__ import annotations

import json
from pathlib import Path

from .server import TINY_MODEL_NAME, VAE_NAME

SIZE = 32  # album image size in pixels: a 2x2 latent, so the random VAE and the tiny model stay fast on the CPU


def train_prompt(
    album: Path,
    cond_file: Path,
    run_name: str,
    steps: int,
    *,
    resume: bool = False,
    checkpoint_every: int = 2,
    sample_every: int = 2,
) -> dict:
    """API-format workflow: tiny Klein + random VAE + test conditioning -> dataset -> encode -> train -> preview."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "3": {"class_type": "KleinLabTestConditioning", "inputs": {"path": str(cond_file)}},
        "4": {
            "class_type": "KleinLabDatasetFolder",
            "inputs": {
                "folder": str(album),
                "trigger": "TOK",
                "trigger_mode": "prepend",
                "resolution": SIZE,
                "default_caption": "",
            },
        },
        "5": {
            "class_type": "KleinLabEncodeDataset",
            "inputs": {
                "dataset": ["4", 0],
                "vae": ["2", 0],
                "conditioning": ["3", 0],
                "validation_prompts": "a photo of [trigger] riding a bicycle",
            },
        },
        "6": {
            "class_type": "KleinLabTrainLora",
            "inputs": {
                "model": ["1", 0],
                "encoded_dataset": ["5", 0],
                "preset": "style",
                "run_name": run_name,
                "resume": resume,
                "rank": 4,
                "alpha": 0.0,
                "learning_rate": 1e-3,
                "steps": steps,
                "batch_size": 1,
                "checkpoint_every": checkpoint_every,
                "sample_every": sample_every,
                "sample_steps": 2,
                "sample_cfg": 1.0,
                "seed": 3,
                "targets": "attention",
                "vae": ["2", 0],
            },
        },
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 2]}},
    }


def with_defaults(server, prompt: dict) -> dict:
    """Fill every required widget a prompt leaves out with its default from /object_info, so the prompt keeps
    working when a node gains a widget."""
    info = server.object_info()
    for node in prompt.values():
        for name, spec in info[node["class_type"]]["input"].get("required", {}).items():
            if name not in node["inputs"] and len(spec) > 1 and "default" in spec[1]:
                node["inputs"][name] = spec[1]["default"]
    return prompt


def execution_error(server, prompt: dict) -> dict:
    """Queue a prompt that must fail while executing; return ComfyUI's execution_error record."""
    entry = server.wait_history(server.queue_prompt(with_defaults(server, prompt)), timeout_s=300)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]["messages"]
    return errors[0]
