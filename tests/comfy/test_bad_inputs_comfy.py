"""Bad inputs and faults that need ComfyUI: models of another architecture loaded by ComfyUI's own UNETLoader, LoRAs
of another architecture or Klein size through the pack's loader path, and an out-of-memory step through the real
server (the prompt fails with the memory advice, the next prompt trains fine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, execution_error, train_prompt, with_defaults
from PIL import Image
from safetensors.torch import save_file

FLUX1_NAME = "tiny_flux1.safetensors"


def tiny_flux1_state_dict() -> dict[str, torch.Tensor]:
    """A FLUX.1-shaped diffusion model (ComfyUI's own Flux class, 1 double + 1 single block, hidden 128), random."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    model = Flux(
        image_model="flux",
        operations=comfy.ops.disable_weight_init,
        in_channels=16,
        out_channels=16,
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=128,
        mlp_ratio=4.0,
        num_heads=1,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[16, 56, 56],
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=False,
        txt_ids_dims=[],
    )
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def env(comfy_root, tiny_model_file, tmp_path_factory):
    """ComfyUI in-process: the tiny Klein and a tiny FLUX.1 loaded by UNETLoader, a loras folder for bad files."""
    import folder_paths

    import nodes

    models = tmp_path_factory.mktemp("bad_models")
    save_file(tiny_flux1_state_dict(), str(models / FLUX1_NAME))
    loras = tmp_path_factory.mktemp("bad_loras")
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    folder_paths.add_model_folder_path("loras", str(loras))
    (klein,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    (flux1,) = nodes.UNETLoader().load_unet(FLUX1_NAME, "default")
    return {"klein": klein, "flux1": flux1, "loras": loras, "flux1_file": models / FLUX1_NAME}


def test_flux1_model_from_unet_loader_is_refused_by_name(env):
    """A FLUX.1 model that ComfyUI's UNETLoader loaded is refused by the pack's nodes with a ValueError that says it
    is not FLUX.2 [klein] and which model to load (model info, the LoRA loader path and the trainer's model check)."""
    from klein_lora_lab.nodes.comfy.forward_loras import StackItem, apply_items
    from klein_lora_lab.nodes.loras.model_info import KleinLabModelInfo
    from klein_lora_lab.trainer_core.model.klein import read_shape

    assert type(env["flux1"].model.diffusion_model).__name__ == "Flux"
    for attempt in (
        lambda: KleinLabModelInfo.execute(env["flux1"]),
        lambda: apply_items(env["flux1"], [StackItem("anything.safetensors", 1.0)]),
        lambda: read_shape(env["flux1"].model.diffusion_model),
    ):
        with pytest.raises(ValueError, match=r"not a FLUX\.2 .*(?i:load a (Klein|FLUX\.2 \[klein\]) Base model)"):
            attempt()


def _klein_lora(hidden: int, name: str, folder: Path) -> str:
    tensors = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, hidden) * 0.01,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * hidden, 2) * 0.01,
    }
    save_file(tensors, str(folder / name))
    return name


BAD_LORAS = [
    ("other Klein size", lambda f: _klein_lora(512, "wide.safetensors", f), ("wide.safetensors", "512")),
    (
        "SDXL LoRA",
        lambda f: _save(
            f,
            "sdxl.safetensors",
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            },
        ),
        ("sdxl.safetensors", "SDXL"),
    ),
    (
        "FLUX.1 LoRA",
        lambda f: _save(
            f,
            "flux1.safetensors",
            {
                "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.zeros(4, 256),
                "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.zeros(1536, 4),
            },
        ),
        ("flux1.safetensors", "FLUX.1"),
    ),
    ("truncated file", lambda f: _truncated(f), ("cut.safetensors", "truncated")),
    ("NaN weights", lambda f: _nan_lora(f), ("nan.safetensors", "NaN")),
]


def _save(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    save_file(tensors, str(folder / name))
    return name


def _truncated(folder: Path) -> str:
    name = _klein_lora(256, "cut.safetensors", folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return name


def _nan_lora(folder: Path) -> str:
    name = _klein_lora(256, "nan.safetensors", folder)
    from safetensors.torch import load_file

    tensors = load_file(str(folder / name))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(folder / name))
    return name


@pytest.mark.parametrize(("make", "words"), [(m, w) for _, m, w in BAD_LORAS], ids=[b[0] for b in BAD_LORAS])
def test_bad_lora_through_the_loader_path_is_refused_by_name(env, make, words):
    """LoRAs of another Klein size or architecture, cut files and NaN files, picked from ComfyUI's loras list and
    applied to the loaded tiny Klein through the loader nodes' path, raise a LoraFormatError (a ValueError) naming
    the file; the MODEL given in is left without forward LoRAs."""
    from klein_lora_lab.nodes.comfy.forward_loras import StackItem, apply_items, forward_loras_of
    from klein_lora_lab.trainer_core.lora.lora_formats import LoraFormatError

    name = make(env["loras"])
    with pytest.raises(LoraFormatError) as info:
        apply_items(env["klein"], [StackItem(name, 1.0)])
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not forward_loras_of(env["klein"])


# ------------------------------------------------------------------------------------------------ through the server


def _album(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (SIZE, SIZE), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a blue square {i}")
    return folder


def _train_prompt(album: Path, cond: Path, run_name: str, resume: bool, inject_at: int | None) -> dict:
    """4 steps, no checkpoints or previews on the way, memory 'least memory' (a mode the artist chose: memory auto
    would answer an out-of-memory by recomputing more and go on); with `inject_at` the model passes through the
    test node that raises out-of-memory at that forward call."""
    prompt = train_prompt(album, cond, run_name, 4, resume=resume, checkpoint_every=0, sample_every=0)
    prompt["10"] = {"class_type": "KleinLabTrainingOptions", "inputs": {"memory": "least memory"}}
    prompt["6"]["inputs"]["options"] = ["10", 0]
    if inject_at is not None:
        prompt["9"] = {"class_type": "KleinLabTestInjectOOM", "inputs": {"model": ["1", 0], "at_call": inject_at}}
        prompt["6"]["inputs"]["model"] = ["9", 0]
    return prompt


def test_out_of_memory_through_the_server_explains_and_the_next_prompt_trains(comfy_server):
    """An out-of-memory error in the 3rd training step (injected by a test node) fails the prompt with the pack's
    TrainingOutOfMemoryError: it names the settings that lower memory and the checkpoint kept (step 2). The server
    keeps serving: the next prompt resumes the same run and finishes it."""
    album = _album(comfy_server.base_dir / "input" / "oom_album")
    cond = tiny_conditioning_path()
    error = execution_error(comfy_server, _train_prompt(album, cond, "oom_run", False, inject_at=3))
    assert error["exception_type"].endswith("TrainingOutOfMemoryError"), error["exception_type"]
    message = error["exception_message"]
    for words in ("out of device memory at step 3", "Tried to allocate 20.00 GiB", "resolution", "fp8", "adamw8bit"):
        assert words in message, message
    assert "last good checkpoint is step_000002.safetensors" in message
    run = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs" / "oom_run"
    assert json.loads((run / "run.json").read_text())["meta"]["status"] == "out_of_memory"
    resume = with_defaults(comfy_server, _train_prompt(album, cond, "oom_run", True, inject_at=None))
    outputs = comfy_server.run_prompt(resume, timeout_s=300)
    assert "oom_run/checkpoints/step_000004.safetensors" in json.dumps(outputs)
    assert json.loads((run / "run.json").read_text())["meta"]["status"] == "finished"
