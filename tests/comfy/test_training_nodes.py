"""Training nodes in a real ComfyUI with the tiny Klein model and the random full-shape Flux2 VAE.

In-process: the encode node's real path (a CLIP object with ComfyUI's tokenize/encode_from_tokens_scheduled
interface) hits the cache on a second pass; training through the glue writes checkpoints that ComfyUI's own
LoRA loader applies with every key matched; the loss-curve node reads the run.
Through the server (/prompt, /history, /interrupt): a workflow produces checkpoints, samples and a loss curve;
a cancel mid-run keeps a loadable, resumable checkpoint; resuming completes the run with the same weights as
an uninterrupted run; a second encode of the same album reads everything from the cache.
"""

from __future__ import annotations

import json
import re
import time
from io import BytesIO
from pathlib import Path

import pytest
import torch
from harness.comfy_test_nodes import FakeClip
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, train_prompt
from harness.server import TINY_MODEL_NAME
from PIL import Image


def make_album(folder: Path, count: int = 3, label: str = "square", tint: int = 0) -> Path:
    """A tiny album: coloured images (one landscape) with captions, the last one without a caption.
    `label` and `tint` make an album whose captions and pixels no other test album shares."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (SIZE * 2, SIZE) if i == 1 else (SIZE, SIZE)
        img = Image.new("RGB", size, (60 * i, 200 - 50 * i, 90 + tint))
        img.paste((255, 255, 255), (4, 4, 12, 12))
        img.save(folder / f"{i:03d}.png")
        if i != count - 1:
            (folder / f"{i:03d}.txt").write_text(f"a small {label} number {i}")
    return folder


# ----------------------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def comfy_env(comfy_root, tiny_model_file, flux2_vae_file, tmp_path_factory):
    """ComfyUI imported in-process with a temporary output folder and the tiny model and VAE registered."""
    import folder_paths

    import nodes

    out = tmp_path_factory.mktemp("comfy_output")
    previous_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    folder_paths.add_model_folder_path("vae", str(flux2_vae_file.parent))
    # Albums live in pytest's temp folders: configured as a datasets folder, as a user would in extra_model_paths.
    folder_paths.add_model_folder_path("datasets", str(tmp_path_factory.getbasetemp()))
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    (vae,) = nodes.VAELoader().load_vae(flux2_vae_file.name)
    yield {"nodes": nodes, "model": model, "vae": vae, "output": out}
    folder_paths.set_output_directory(previous_output)  # other in-process tests keep ComfyUI's own folder


def test_encode_node_clip_path_caches(comfy_env, tiny_spec, tmp_path):
    """Through the CLIP interface every distinct caption (plus the empty prompt, the bicycle prompt and each
    caption without its trigger) is encoded once; a second pass encodes nothing and returns identical tensors."""
    from klein_lora_lab.nodes.train.dataset_folder import KleinLabDatasetFolder
    from klein_lora_lab.nodes.train.encode_dataset import KleinLabEncodeDataset

    album = make_album(tmp_path / "album")
    dataset, summary = KleinLabDatasetFolder.execute(str(album), "TOK", "prepend", SIZE, "").result
    assert "3 images" in summary and "002.png" in summary
    clip = FakeClip(tiny_spec.context_dim)
    prompts = "a photo of [trigger] riding a bicycle"
    first, report1 = KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], prompts, clip=clip).result
    # ... and each caption without its trigger, for preservation ("TOK" alone becomes the empty prompt).
    assert sorted(clip.encoded) == sorted(
        [
            "TOK, a small square number 0",
            "TOK, a small square number 1",
            "TOK",
            "a photo of TOK riding a bicycle",
            "",
            "a small square number 0",
            "a small square number 1",
        ]
    )
    w, h = dataset.items[1].bucket
    assert w > h and first.items[1].latent.shape == (128, h // 16, w // 16)
    assert "10 encoded, 0 from cache" in report1
    clip.encoded.clear()
    second, report2 = KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], prompts, clip=clip).result
    assert clip.encoded == [] and "0 encoded, 10 from cache" in report2
    for a, b in zip(first.items, second.items, strict=True):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)
        assert torch.equal(a.free_context, b.free_context)
    with pytest.raises(ValueError, match="connect 'clip'"):
        KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], prompts)


def test_glue_training_writes_checkpoints_stock_loader_applies(comfy_env, tiny_spec, tmp_path):
    """Training through the glue on the loaded MODEL writes checkpoints listed in ComfyUI's loras list, leaves
    in_training off and the input MODEL unpatched; ComfyUI's LoRA loader applies the file with every key used."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    from klein_lora_lab.nodes.comfy.forward_loras import forward_loras_of
    from klein_lora_lab.nodes.comfy.paths import lora_list_name, register_runs_folder
    from klein_lora_lab.nodes.comfy.train_setup import new_or_resumed_run, sample_config, settings_from_widgets
    from klein_lora_lab.nodes.comfy.training import model_with_lora, train_in_comfy
    from klein_lora_lab.nodes.train.dataset_folder import KleinLabDatasetFolder
    from klein_lora_lab.nodes.train.encode_dataset import KleinLabEncodeDataset
    from klein_lora_lab.nodes.train.loss_curve import KleinLabLossCurve

    register_runs_folder()
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
    run = new_or_resumed_run("inprocess", settings, encoded, resume=False)
    model = comfy_env["model"]
    patches_before = dict(model.patches)
    with torch.inference_mode():  # as ComfyUI executes nodes
        outcome = train_in_comfy(
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
    names = [lora_list_name(p) for p in run.checkpoints()]
    assert names == ["inprocess/checkpoints/step_000002.safetensors", "inprocess/checkpoints/step_000004.safetensors"]
    listed = folder_paths.get_filename_list("loras")
    assert all(n in listed for n in names)
    assert len(outcome.sample_files) == 2 and all(p.is_file() for p in outcome.sample_files)

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", names[-1]), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    assert len(loaded) == len({k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] for k in lora})
    trained = model_with_lora(model, names[-1])
    assert forward_loras_of(trained) is not None and forward_loras_of(model) is None
    assert trained.patches == model.patches == patches_before  # forward-time LoRA: no weight patches

    curve, per_image = KleinLabLossCurve.execute("inprocess", 400, 200, 0.9).result
    assert curve.shape == (1, 200, 400, 3) and per_image.startswith("per-image loss")


# ----------------------------------------------------------------------------------------------- server

RUN_STEPS = 4


def encode_prompt(album: Path, cond_file: Path, trigger: str) -> dict:
    """Only the dataset and encode nodes, with the report shown by core's PreviewAny (an output node)."""
    prompt = {k: v for k, v in train_prompt(album, cond_file, "unused", 1).items() if k in ("2", "3", "4", "5")}
    prompt["4"]["inputs"]["trigger"] = trigger
    prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}
    return prompt


def runs_folder(server) -> Path:
    return server.base_dir / "output" / "klein_lora_lab" / "runs"


def encode_report(outputs: dict) -> str:
    text = outputs["8"]["text"][0]
    assert re.search(r"\d+ encoded, \d+ from cache, [\d.]+ s", text), text
    return text


@pytest.fixture(scope="module")
def cond_file(tiny_spec) -> Path:
    return tiny_conditioning_path(tiny_spec, tokens=8)


def test_workflow_trains_samples_and_draws_the_loss_curve(comfy_server, cond_file, tmp_path):
    """/prompt runs the whole workflow: checkpoints every 2 steps (listed as loras), decoded previews, a loss
    curve IMAGE, and the returned name is what the stock LoRA loader lists and loads without unmatched keys."""
    album = make_album(comfy_server.base_dir / "input" / "album")  # albums must lie in ComfyUI's folders
    outputs = comfy_server.run_prompt(train_prompt(album, cond_file, "wf", RUN_STEPS), timeout_s=600)
    run = runs_folder(comfy_server) / "wf"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_??????.safetensors")) == [
        "step_000002.safetensors",
        "step_000004.safetensors",
    ]
    samples = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert samples == ["step_000002_prompt0.png", "step_000004_prompt0.png"]
    assert Image.open(run / "samples" / samples[0]).size == (SIZE, SIZE)
    assert "Finished 4 steps" in outputs["6"]["text"][0]
    print(f"\nworkflow: {outputs['6']['text'][0]}")
    assert [img["filename"] for img in outputs["6"]["images"]] == samples
    curve = outputs["7"]["images"][0]
    assert Image.open(BytesIO(comfy_server.view_file(curve["filename"], curve["subfolder"], curve["type"]))).size == (
        768,
        384,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "val_loss" in records[1]

    loras = comfy_server.get_json("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    listed = loras["lora_name"][0]
    assert "wf/checkpoints/step_000004.safetensors" in listed
    load = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": "wf/checkpoints/step_000004.safetensors", "strength_model": 1.0},
        },
        "3": {"class_type": "KleinLabModelInfo", "inputs": {"model": ["2", 0]}},
    }
    before = len(comfy_server.log_text())
    comfy_server.run_prompt(load)
    assert "lora key not loaded" not in comfy_server.log_text()[before:]


def test_second_encode_of_the_same_album_hits_the_cache(comfy_server, cond_file, tmp_path):
    """Re-running the encode on the same album (files touched, so ComfyUI re-executes the nodes) encodes
    nothing: every latent and conditioning comes from the disk cache. Prints both encode times."""
    album = make_album(comfy_server.base_dir / "input" / "album_cache", count=4, label="cached", tint=17)
    first = encode_report(comfy_server.run_prompt(encode_prompt(album, cond_file, "CACHETOK"), timeout_s=300))
    for path in album.iterdir():  # same bytes, new mtimes: the album node's fingerprint changes
        path.touch()
    second = encode_report(comfy_server.run_prompt(encode_prompt(album, cond_file, "CACHETOK"), timeout_s=300))
    # 4 images + 4 distinct captions (3 files, 1 trigger-only) + the validation prompt; no empty caption
    # with a fixed conditioning.
    assert "4 images: 9 latents/conditionings, 9 encoded, 0 from cache" in first, first
    assert "4 images: 9 latents/conditionings, 0 encoded, 9 from cache" in second, second
    print(f"\nencode first run: {first}\nencode cached run: {second}")


def wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)


def test_cancel_keeps_a_resumable_run_and_resume_finishes_it_exactly(comfy_server, cond_file, tmp_path):
    """/interrupt mid-run ends the prompt as interrupted but leaves a LoRA checkpoint that loads, with its
    resume state; resume=true continues from there to the end, and the final LoRA equals the one an
    uninterrupted run with the same settings produces."""
    from klein_lora_lab.trainer_core.lora.lora_file import load_lora
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step

    album = make_album(comfy_server.base_dir / "input" / "album_cancel")
    run_dir = runs_folder(comfy_server) / "cancel"
    prompt_id = comfy_server.queue_prompt(
        train_prompt(album, cond_file, "cancel", 5000, checkpoint_every=3, sample_every=0)
    )
    wait_for(run_dir / "checkpoints" / "step_000003.safetensors", 300)
    comfy_server.interrupt()
    entry = comfy_server.wait_history(prompt_id, timeout_s=120)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])

    run = RunFolder.open(run_dir)
    last = run.latest_checkpoint()
    stopped_at = checkpoint_step(last)
    assert 3 <= stopped_at < 5000 and run.latest_resumable() == last
    weights, meta = load_lora(last)
    assert weights and meta["klein_lab.step"] == str(stopped_at)
    cancelled = [line for line in comfy_server.log_text().splitlines() if "Cancelled at step" in line]
    assert cancelled and f"step_{stopped_at:06d}.safetensors" in cancelled[-1]
    print(f"\ncancel: {cancelled[-1]}")

    final = stopped_at + 3
    outputs = comfy_server.run_prompt(
        train_prompt(album, cond_file, "cancel", final, resume=True, checkpoint_every=3, sample_every=0), timeout_s=600
    )
    assert f"Finished {final} steps" in outputs["6"]["text"][0]
    print(f"resume: {outputs['6']['text'][0]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, final + 1))

    comfy_server.run_prompt(
        train_prompt(album, cond_file, "reference", final, checkpoint_every=3, sample_every=0), timeout_s=600
    )
    resumed, _ = load_lora(RunFolder.open(run_dir).latest_checkpoint())
    reference, _ = load_lora(RunFolder.open(runs_folder(comfy_server) / "reference").latest_checkpoint())
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name].down, reference[name].down), name
        assert torch.equal(resumed[name].up, reference[name].up), name


SOCKET_TYPES = {
    "MODEL",
    "CLIP",
    "VAE",
    "CONDITIONING",
    "IMAGE",
    "KLEIN_DATASET",
    "KLEIN_ENCODED_DATASET",
    "KLEIN_TRAINING_OPTIONS",
    "*",
}


@pytest.mark.parametrize(
    "name", ["Klein 01 - Train a style LoRA.json", "Klein 08 - Train an edit LoRA from image pairs.json"]
)
def test_example_workflow_matches_the_nodes(comfy_server, name):
    """Each shipped training workflow uses nodes this ComfyUI knows, with inputs in the server's order, one widget
    value per widget input, and links whose slots carry the declared types (what the frontend needs to load it).
    An optional socket input added after the workflow was saved may be absent (the frontend adds it on load)."""
    workflow = json.loads((Path(__file__).parents[2] / "workflows" / name).read_text())
    info = comfy_server.object_info()
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] == "MarkdownNote":
            continue
        assert node["type"] in info, node["type"]
        if not node["type"].startswith("KleinLab"):
            continue
        spec = info[node["type"]]
        all_inputs = {**spec["input"]["required"], **spec["input"].get("optional", {})}
        names = [i["name"] for i in node["inputs"]]
        order = spec["input_order"]["required"] + [
            n for n in spec["input_order"].get("optional", []) if n in names or not _is_socket(all_inputs[n])
        ]
        assert names == order, node["type"]
        widgets = [n for n in order if not _is_socket(all_inputs[n])]
        assert len(node["widgets_values"]) == len(widgets), node["type"]
        for name, value in zip(widgets, node["widgets_values"], strict=True):
            kind = all_inputs[name][0]
            if isinstance(kind, list):
                assert value in kind, (node["type"], name, value)
            elif kind == "COMBO":
                assert value in all_inputs[name][1]["options"], (node["type"], name, value)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["type"] in (kind, "*")


def _is_socket(spec) -> bool:
    return isinstance(spec[0], str) and spec[0] in SOCKET_TYPES


def test_image_pairs_train_with_reference_latents(comfy_env, tiny_spec, tmp_path):
    """An image-to-image album trains through the glue: items carry the encoded reference, previews sample
    with it, and the checkpoint records the image_to_image preset's rank."""
    from klein_lora_lab.nodes.comfy.train_setup import new_or_resumed_run, sample_config, settings_from_widgets
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.nodes.train.dataset_pairs import KleinLabDatasetPairs
    from klein_lora_lab.nodes.train.encode_dataset import KleinLabEncodeDataset
    from klein_lora_lab.trainer_core.lora.lora_file import load_lora

    make_album(tmp_path / "pimpmyride", label="pimped car", tint=40)
    make_album(tmp_path / "pimpmyride_control", label="plain car", tint=80)
    dataset, summary = KleinLabDatasetPairs.execute(
        str(tmp_path / "pimpmyride_control"), str(tmp_path / "pimpmyride"), "pimpmyride", "prepend", SIZE, ""
    ).result
    assert "3 pairs" in summary
    clip = FakeClip(tiny_spec.context_dim)
    encoded, _ = KleinLabEncodeDataset.execute(dataset, comfy_env["vae"], "[trigger], a sports car", clip=clip).result
    assert all(len(item.refs) == 1 and item.refs[0].shape == item.latent.shape for item in encoded.items)
    settings = settings_from_widgets(
        "image_to_image",
        rank=0,
        alpha=0.0,
        learning_rate=0.0,
        steps=2,
        batch_size=1,
        checkpoint_every=0,
        sample_every=2,
        seed=0,
        targets="attention",
    )
    run = new_or_resumed_run("pairs", settings, encoded, resume=False)
    with torch.inference_mode():
        outcome = train_in_comfy(
            comfy_env["model"],
            encoded.items,
            settings,
            run,
            False,
            None,
            sample_config(encoded, 2, 2.0, 0),
            encoded.empty_context,
            None,
        )
    assert outcome.result.steps_done == 2 and len(outcome.sample_files) == 1
    _, meta = load_lora(outcome.checkpoint)
    assert meta["klein_lab.rank"] == "32" and meta["klein_lab.trigger"] == "pimpmyride"
