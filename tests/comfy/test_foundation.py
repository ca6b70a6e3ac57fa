"""Foundation of the comfy tier: the pack loads in a real ComfyUI, and core nodes run the tiny Klein model.

Two paths: in-process (ComfyUI's node classes called directly, conditioning fed as `[[tensor, {}]]`) and
through a real headless server (API-format prompts; conditioning comes from a test-only loader node that sits
only in the test server's temp custom_nodes).
"""

from __future__ import annotations

import asyncio
import importlib
import io

import pytest
import torch
from harness.fixtures import tiny_conditioning, tiny_conditioning_path
from harness.server import PACK_DIR_NAME, TINY_MODEL_NAME, pack_import_errors
from safetensors.torch import load

SIZE = 64  # pixels; the latent is SIZE/16 = 4x4 tokens, so CPU sampling takes well under a second
STEPS = 4
SEED = 7


def pack_node_ids() -> list[str]:
    """Node ids of every node module listed in nodes/extension.py (so new nodes are covered automatically)."""
    extension = importlib.import_module("klein_lora_lab.nodes.extension")
    nodes = asyncio.run(extension.KleinLabExtension().get_node_list())
    return [node.define_schema().node_id for node in nodes]


def sampling_prompt(cond_file: str, *, seed: int = SEED, steps: int = STEPS, tail: dict | None = None) -> dict:
    """API-format prompt: UNETLoader(tiny Klein) -> KSampler -> SaveLatent, plus optional extra nodes."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "KleinLabTestConditioning", "inputs": {"path": cond_file}},
        "3": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "4": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["2", 0],
                "negative": ["2", 0],
                "latent_image": ["3", 0],
                "denoise": 1.0,
            },
        },
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "klein_lab/latent"}},
    }
    prompt.update(tail or {})
    return prompt


def fetch_latent(server, outputs: dict, node_id: str) -> torch.Tensor:
    """The latent a SaveLatent node wrote, read back through /view as the frontend would."""
    ref = outputs[node_id]["latents"][0]
    return load(server.view_file(ref["filename"], ref["subfolder"], ref["type"]))["latent_tensor"]


@pytest.fixture(scope="module")
def inprocess_nodes(comfy_root, tiny_model_file):
    """ComfyUI's core node module imported in this process, with the tiny model's folder registered."""
    import folder_paths

    import nodes

    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    return nodes


@pytest.fixture(scope="module")
def inprocess_model(inprocess_nodes, tiny_model_file):
    (model,) = inprocess_nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    return model


def inprocess_sample(nodes, model, spec, seed: int = SEED) -> torch.Tensor:
    cond = [[tiny_conditioning(spec), {}]]
    latent = {"samples": torch.zeros(1, 128, SIZE // 16, SIZE // 16)}
    (out,) = nodes.KSampler().sample(model, seed, STEPS, 1.0, "euler", "simple", cond, cond, latent)
    return out["samples"]


# --- in-process ---------------------------------------------------------------------------------------------


def test_unet_loader_detects_tiny_klein_as_flux2(inprocess_model, tiny_spec) -> None:
    """Core's UNETLoader picks ComfyUI's Flux2 model config for the tiny file and builds its real block counts."""
    import comfy.supported_models

    assert type(inprocess_model.model.model_config) is comfy.supported_models.Flux2
    diffusion_model = inprocess_model.model.diffusion_model
    assert len(diffusion_model.double_blocks) == tiny_spec.double_blocks
    assert len(diffusion_model.single_blocks) == tiny_spec.single_blocks
    assert diffusion_model.img_in.in_features == 128


def test_inprocess_ksampler_samples_tiny_klein(inprocess_nodes, inprocess_model, tiny_spec) -> None:
    """Core's KSampler denoises with the tiny Klein: finite latent of the right shape, and the seed matters."""
    a = inprocess_sample(inprocess_nodes, inprocess_model, tiny_spec, seed=SEED)
    b = inprocess_sample(inprocess_nodes, inprocess_model, tiny_spec, seed=SEED + 1)
    assert a.shape == (1, 128, SIZE // 16, SIZE // 16)
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b)


# --- through the real server ------------------------------------------------------------------------------------


def test_server_loads_pack_without_import_error(comfy_server) -> None:
    """The server's startup log lists the pack among loaded custom nodes and shows no import failure/traceback for
    it (only the startup part: later prompts of the shared session server may log errors on purpose)."""
    log = comfy_server.startup_log
    assert pack_import_errors(log) == [], comfy_server.log_tail()
    loaded = [line for line in log.splitlines() if line.rstrip().endswith(PACK_DIR_NAME)]
    assert loaded and not any("IMPORT FAILED" in line for line in loaded), comfy_server.log_tail()


def test_object_info_lists_every_pack_node(comfy_root, comfy_server) -> None:
    """/object_info lists every node of every module in nodes/extension.py, in our category."""
    ids = pack_node_ids()
    assert "KleinLabModelInfo" in ids
    info = comfy_server.object_info()
    missing = [node_id for node_id in ids if node_id not in info]
    assert missing == [], f"nodes missing from /object_info: {missing}"
    for node_id in ids:
        assert info[node_id]["category"].startswith("Klein LoRA Lab"), node_id


def test_server_samples_tiny_klein_like_inprocess(comfy_server, inprocess_nodes, inprocess_model, tiny_spec) -> None:
    """UNETLoader + core KSampler through the server produce the same latent as in-process for the same seed."""
    outputs = comfy_server.run_prompt(sampling_prompt(str(tiny_conditioning_path(tiny_spec))))
    latent = fetch_latent(comfy_server, outputs, "5")
    assert latent.shape == (1, 128, SIZE // 16, SIZE // 16)
    assert torch.isfinite(latent).all()
    expected = inprocess_sample(inprocess_nodes, inprocess_model, tiny_spec)
    torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)


def test_model_info_reports_block_counts_through_server(comfy_server, tiny_spec) -> None:
    """KleinLabModelInfo, run by the server on the loaded tiny Klein, reports the file's real block counts."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "KleinLabModelInfo", "inputs": {"model": ["1", 0]}},
    }
    text = comfy_server.run_prompt(prompt)["2"]["text"][0]
    assert f"{tiny_spec.double_blocks} double + {tiny_spec.single_blocks} single blocks" in text
    assert f"hidden {tiny_spec.hidden}" in text and f"text context {tiny_spec.context_dim}" in text


def test_interrupt_stops_a_running_prompt(comfy_server, tiny_spec) -> None:
    """/interrupt ends a long sampling run early: the prompt finishes with status 'error' (interrupted)."""
    prompt = sampling_prompt(str(tiny_conditioning_path(tiny_spec)), seed=SEED + 2, steps=10000)
    prompt_id = comfy_server.queue_prompt(prompt)
    comfy_server.wait_running(prompt_id, timeout_s=60)
    comfy_server.interrupt()
    entry = comfy_server.wait_history(prompt_id, timeout_s=60)
    assert entry["status"]["status_str"] == "error"
    events = [name for name, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events


def test_vae_decodes_sampled_latent_through_server(comfy_server, tiny_spec) -> None:
    """VAELoader loads the random Flux2 VAE in the server; VAEDecode turns the 1/16 latent into a 64x64 PNG."""
    from harness.server import VAE_NAME
    from PIL import Image

    tail = {
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "klein_lab/decoded"}},
    }
    outputs = comfy_server.run_prompt(sampling_prompt(str(tiny_conditioning_path(tiny_spec)), tail=tail))
    ref = outputs["8"]["images"][0]
    image = Image.open(io.BytesIO(comfy_server.view_file(ref["filename"], ref["subfolder"], ref["type"])))
    assert image.size == (SIZE, SIZE)
