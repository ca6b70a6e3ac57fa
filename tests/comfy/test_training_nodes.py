"""Training nodes in a real ComfyUI with the tiny Klein model and the random full-shape Flux2 VAE.

In-process: the encode node's real path (a CLIP object with ComfyUI's tokenize/encode_from_tokens_scheduled
interface) hits the cache on a second pass; training through the glue writes checkpoints that ComfyUI's own
LoRA loader applies with every key matched; the loss-curve node reads the run.
Through the server (/prompt, /history, /interrupt): a workflow produces checkpoints, samples and a loss curve;
a cancel mid-run keeps a loadable, resumable checkpoint; resuming completes the run with the same weights as
an uninterrupted run; a second encode of the same album reads everything from the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

SIZE = 32  # pixels: a 2x2 latent, so the random VAE and the tiny model stay fast on the CPU


def make_album(folder: Path, count: int = 3) -> Path:
    """A tiny album: coloured images (one landscape) with captions, one without a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (SIZE * 2, SIZE) if i == 1 else (SIZE, SIZE)
        img = Image.new("RGB", size, (60 * i, 200 - 50 * i, 90))
        img.paste((255, 255, 255), (4, 4, 12, 12))
        img.save(folder / f"{i:03d}.png")
        if i != count - 1:
            (folder / f"{i:03d}.txt").write_text(f"a small square number {i}")
    return folder


class FakeClip:
    """ComfyUI's CLIP interface (tokenize -> encode_from_tokens_scheduled) over a deterministic stand-in
    encoder; counts the encodes. There is no tiny Qwen3, so this is how the CLIP path runs in tests."""

    def __init__(self, context_dim: int) -> None:
        self.cond_stage_model = torch.nn.Linear(4, context_dim, bias=False)
        torch.nn.init.constant_(self.cond_stage_model.weight, 0.01)
        self.context_dim = context_dim
        self.encoded: list[str] = []

    def tokenize(self, text: str):
        return {"qwen3_4b": [[(float(ord(c)), 1.0) for c in text] or [(0.0, 1.0)]]}

    def encode_from_tokens_scheduled(self, tokens):
        codes = torch.tensor([t for t, _ in tokens["qwen3_4b"][0]])
        self.encoded.append("".join(chr(int(c)) for c in codes if c > 0))
        gen = torch.Generator().manual_seed(int(codes.sum().item()) % (2**31))
        cond = torch.randn(1, len(codes), self.context_dim, generator=gen)
        return [[cond, {"pooled_output": None}]]


# ----------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def comfy_env(comfy_root, tiny_model_file, flux2_vae_file, tmp_path_factory):
    """ComfyUI imported in-process with a temporary output folder and the tiny model and VAE registered."""
    import folder_paths

    import nodes

    out = tmp_path_factory.mktemp("comfy_output")
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("vae", str(flux2_vae_file.parent))
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    (vae,) = nodes.VAELoader().load_vae(flux2_vae_file.name)
    return {"nodes": nodes, "model": model, "vae": vae, "output": out}


def test_encode_node_clip_path_caches(comfy_env, tiny_spec, tmp_path):
    """Through the CLIP interface every distinct caption (plus the empty prompt and the bicycle prompt) is
    encoded once; a second pass encodes nothing and returns identical tensors."""
    from klein_lora_lab.nodes.dataset_folder import KleinLabDatasetFolder
    from klein_lora_lab.nodes.encode_dataset import KleinLabEncodeDataset

    album = make_album(tmp_path / "album")
    dataset, summary = KleinLabDatasetFolder.execute(str(album), "TOK", "prepend", SIZE, "").result
    assert "3 images" in summary and "002.png" in summary
    clip = FakeClip(tiny_spec.context_dim)
    prompts = "a photo of [trigger] riding a bicycle"
    first, report1 = KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], prompts, clip=clip).result
    assert sorted(clip.encoded) == sorted(
        ["TOK, a small square number 0", "TOK, a small square number 1", "TOK", "a photo of TOK riding a bicycle", ""]
    )
    w, h = dataset.items[1].bucket
    assert w > h and first.items[1].latent.shape == (128, h // 16, w // 16)
    assert "8 encoded, 0 from cache" in report1
    clip.encoded.clear()
    second, report2 = KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], prompts, clip=clip).result
    assert clip.encoded == [] and "0 encoded, 8 from cache" in report2
    for a, b in zip(first.items, second.items, strict=True):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)
    with pytest.raises(ValueError, match="connect 'clip'"):
        KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], prompts)


def test_glue_training_writes_checkpoints_stock_loader_applies(comfy_env, tiny_spec, tmp_path):
    """Training through the glue on the loaded MODEL writes checkpoints listed in ComfyUI's loras list, leaves
    in_training off and the input MODEL unpatched; ComfyUI's LoRA loader applies the file with every key used."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    from klein_lora_lab.nodes import comfy_glue
    from klein_lora_lab.nodes.dataset_folder import KleinLabDatasetFolder
    from klein_lora_lab.nodes.encode_dataset import KleinLabEncodeDataset
    from klein_lora_lab.nodes.loss_curve import KleinLabLossCurve
    from klein_lora_lab.nodes.train_lora import open_run, sample_config, settings_from_widgets

    comfy_glue.register_runs_folder()
    album = make_album(tmp_path / "album")
    dataset, _ = KleinLabDatasetFolder.execute(str(album), "TOK", "prepend", SIZE, "").result
    encoded, _ = KleinLabEncodeDataset.execute(
        dataset, comfy_env["vae"], "a photo of [trigger] riding a bicycle", clip=FakeClip(tiny_spec.context_dim)
    ).result
    settings = settings_from_widgets(
        "style",
        rank=4,
        alpha=0.0,
        learning_rate=1e-3,
        steps=4,
        batch_size=1,
        checkpoint_every=2,
        sample_every=2,
        seed=1,
        targets="attention",
    )
    assert settings.rank == 4 and settings.alpha == 16.0 and settings.validation_every == 2
    run = open_run("inprocess", settings, encoded, resume=False)
    model = comfy_env["model"]
    patches_before = dict(model.patches)
    with torch.inference_mode():  # as ComfyUI executes nodes
        outcome = comfy_glue.train_in_comfy(
            model,
            encoded.items,
            settings,
            run,
            False,
            None,
            sample_config(encoded, 2, 4.0, 1),
            encoded.empty_context,
            None,
        )
    assert not outcome.interrupted and outcome.result.steps_done == 4
    assert mm.in_training is False and model.patches == patches_before
    names = [comfy_glue.lora_list_name(p) for p in run.checkpoints()]
    assert names == ["inprocess/checkpoints/step_000002.safetensors", "inprocess/checkpoints/step_000004.safetensors"]
    listed = folder_paths.get_filename_list("loras")
    assert all(n in listed for n in names)
    assert len(outcome.sample_files) == 2 and all(p.is_file() for p in outcome.sample_files)

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", names[-1]), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    assert len(loaded) == len({k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in lora})
    trained = comfy_glue.model_with_lora(model, outcome.checkpoint)
    assert len(trained.patches) == len(loaded) and model.patches == patches_before

    (curve,) = KleinLabLossCurve.execute("inprocess", 400, 200, 0.9).result
    assert curve.shape == (1, 200, 400, 3)
