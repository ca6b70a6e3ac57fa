"""Edit LoRAs with several references, against ComfyUI's own Flux2 code and through the real server.

ComfyUI's ReferenceLatent node appends each image's latent to the conditioning's `reference_latents`; Flux2
gives reference k its own RoPE index (10·k) at row/column offset 0. The training forward must place several
references exactly so, in the same order, or a LoRA trained on two references would see another layout at
inference. Through /prompt, the pairs dataset with two reference folders (or files named _ref1/_ref2) trains an
edit LoRA on the tiny model with previews.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from harness.fixtures import tiny_conditioning_path
from harness.prompts import SIZE, train_prompt, with_defaults
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein, tiny_klein_state_dict
from klein_lora_lab.trainer_core.training.data import pad_context
from klein_lora_lab.trainer_core.training.sampling import flux2_sigmas, sample
from PIL import Image

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=2, context_dim=32)


def _comfy_model(seed: int):
    """The tiny Klein as ComfyUI loads a diffusion model file (detected as flux2), in fp32 on the CPU."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(
        tiny_klein_state_dict(SPEC, seed), model_options={"dtype": torch.float32}
    )
    assert type(patcher.model).__name__ == "Flux2"
    return patcher


def test_two_references_are_placed_as_comfyui_places_them(comfy_root: Path) -> None:
    """Two references of different sizes: our training forward equals ComfyUI's Flux2 diffusion model given
    ref_latents=[r1, r2], in both orders, and the order matters (swapping them changes the velocity, so the
    comparison would catch references placed in the wrong order or at the same index)."""
    patcher = _comfy_model(4)
    ours = tiny_klein(SPEC, 4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 128, 3, 4, generator=g)
    r1, r2 = torch.randn(1, 128, 2, 3, generator=g), torch.randn(1, 128, 4, 2, generator=g)
    ctx = pad_context(tiny_conditioning(SPEC, 6, seed=1))
    sigma = torch.tensor([0.6])
    outputs = {}
    for name, refs in (("r1, r2", [r1, r2]), ("r2, r1", [r2, r1])):
        with torch.no_grad():
            comfy_v = patcher.model.diffusion_model(x, sigma, context=ctx, ref_latents=refs)
            ours_v = klein_forward(ours, x, sigma, ctx, refs)
        torch.testing.assert_close(ours_v, comfy_v, rtol=1e-4, atol=1e-5)
        outputs[name] = ours_v
        print(f"\n[multiref] {name}: max |ComfyUI − ours| = {(comfy_v - ours_v).abs().max().item():.3g}")
    assert (outputs["r1, r2"] - outputs["r2, r1"]).abs().max() > 1e-3


def test_two_chained_reference_latent_nodes_sample_as_our_previews(comfy_root: Path) -> None:
    """Two ReferenceLatent nodes chained on the conditioning (as the apply workflow does for two references)
    give core's sampler the same result as our preview sampler given refs=[r1, r2]: inference sees what
    training and its previews saw."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_edit_model import ReferenceLatent

    patcher = _comfy_model(5)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 128, 2, 2, generator=g)
    r1, r2 = torch.randn(1, 128, 2, 2, generator=g), torch.randn(1, 128, 2, 2, generator=g)
    ctx, neg = tiny_conditioning(SPEC, 6, seed=1), tiny_conditioning(SPEC, 3, seed=2)
    positive, negative = [[ctx, {}]], [[neg, {}]]
    for ref in (r1, r2):
        (positive,) = ReferenceLatent.execute(positive, {"samples": ref}).result
        (negative,) = ReferenceLatent.execute(negative, {"samples": ref}).result
    assert [t.data_ptr() for t in positive[0][1]["reference_latents"]] == [r1.data_ptr(), r2.data_ptr()]
    sigmas = flux2_sigmas(4, 4)
    comfy_out = comfy.sample.sample_custom(
        patcher,
        noise,
        3.0,
        comfy.samplers.sampler_object("euler"),
        sigmas,
        positive,
        negative,
        torch.zeros_like(noise),
        disable_pbar=True,
    )
    ours = sample(tiny_klein(SPEC, 5), noise, ctx, sigmas, negative_context=neg, cfg=3.0, refs=[r1, r2])
    torch.testing.assert_close(ours, comfy_out, rtol=1e-4, atol=1e-4)
    swapped = sample(tiny_klein(SPEC, 5), noise, ctx, sigmas, negative_context=neg, cfg=3.0, refs=[r2, r1])
    assert (swapped - comfy_out).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- server


def _pictures(folder: Path, tint: int, names: tuple[str, ...] = ("000", "001", "002"), captions: bool = False):
    """Small pictures (one landscape) under the given stems; a caption per picture when `captions`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(names):
        size = (SIZE * 2, SIZE) if i == 1 else (SIZE, SIZE)
        img = Image.new("RGB", size, (60 * i, (200 - 50 * i + tint) % 256, (90 + tint) % 256))
        img.paste((255, 255, 255), (4 + i, 4, 12 + i, 12))
        img.save(folder / f"{stem}.png")
        if captions:
            (folder / f"{stem}.txt").write_text(f"[trigger], a dressed figure number {i}")
    return folder


def pairs_prompt(reference_folder: str, target: Path, cond_file: Path, run_name: str) -> dict:
    """The training graph of harness.prompts with the pairs dataset (image_to_image preset) and its summary."""
    prompt = train_prompt(target, cond_file, run_name, 2, checkpoint_every=2, sample_every=2)
    prompt["4"] = {
        "class_type": "KleinLabDatasetPairs",
        "inputs": {
            "reference_folder": reference_folder,
            "target_folder": str(target),
            "trigger": "TOK",
            "trigger_mode": "prepend",
            "resolution": SIZE,
            "default_caption": "",
        },
    }
    prompt["6"]["inputs"].update(preset="image_to_image", rank=4, learning_rate=1e-3)
    prompt["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}
    return prompt


def test_server_trains_a_two_reference_edit_lora(comfy_server, tiny_spec) -> None:
    """Through /prompt: two reference folders (one per line) train an edit LoRA with checkpoints and decoded
    previews, every reference encoded; the same pictures laid out as 001_ref1/001_ref2 in one folder give the
    very same LoRA; with the two references in the other order the LoRA differs (both references reach the
    training forward, in the order given)."""
    from klein_lora_lab.trainer_core.lora.lora_file import load_lora
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder

    cond_file = tiny_conditioning_path(tiny_spec, tokens=8)
    root = comfy_server.base_dir / "input" / "multiref"
    pose, garment = _pictures(root / "pose", 10), _pictures(root / "garment", 120)
    target = _pictures(root / "dressed", 60, captions=True)
    numbered = root / "numbered"
    numbered.mkdir(parents=True, exist_ok=True)
    for k, folder in enumerate((pose, garment), 1):
        for path in folder.glob("*.png"):
            (numbered / f"{path.stem}_ref{k}.png").write_bytes(path.read_bytes())

    runs = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    weights = {}
    for run_name, refs in (("mr_folders", f"{pose}\n{garment}"), ("mr_numbered", str(numbered))):
        outputs = comfy_server.run_prompt(
            with_defaults(comfy_server, pairs_prompt(refs, target, cond_file, run_name)), timeout_s=600
        )
        summary, report = outputs["8"]["text"][0], outputs["9"]["text"][0]
        assert "3 pairs (2 references → target)" in summary, summary
        # 3 targets + 6 references, 3 captions + the validation prompt (a fixed conditioning: no empty caption).
        assert re.search(r"3 pairs: 13 latents/conditionings", report), report
        assert "Finished 2 steps" in outputs["6"]["text"][0]
        run = RunFolder.open(runs / run_name)
        assert [p.name for p in run.checkpoints()] == ["step_000002.safetensors"]
        assert [p.name for p in sorted((runs / run_name / "samples").glob("*.png"))] == ["step_000002_prompt0.png"]
        weights[run_name], _ = load_lora(run.latest_checkpoint())
        print(f"\n[multiref] {run_name}: {summary.splitlines()[1]}")
    swapped = pairs_prompt(f"{garment}\n{pose}", target, cond_file, "mr_swapped")
    comfy_server.run_prompt(with_defaults(comfy_server, swapped), timeout_s=600)
    weights["mr_swapped"], _ = load_lora(RunFolder.open(runs / "mr_swapped").latest_checkpoint())

    folders, numbered_w, swapped_w = weights["mr_folders"], weights["mr_numbered"], weights["mr_swapped"]
    assert folders.keys() == numbered_w.keys() == swapped_w.keys()
    for name in folders:
        assert torch.equal(folders[name].up, numbered_w[name].up), name
    assert max((folders[n].up - swapped_w[n].up).abs().max().item() for n in folders) > 0
