"""The Klein LoRA Lab demo, run by `bash scripts/demo.sh`: what the pack does today, end to end, on this machine.

It needs a ComfyUI checkout (COMFYUI_PATH, the ComfyUI this pack sits in, or the one scripts/setup.sh cloned).
Steps, each reported in the summary:
  1. write the embedded tiny Klein (a randomly initialised FLUX.2 [klein]-shaped diffusion model, about 40 MB) as
     safetensors, the way a real Klein checkpoint is stored, and load it with ComfyUI's own UNETLoader;
  2. train a LoRA on it with the pack's training path (the code behind the Train LoRA node) on a generated toy
     album, into a run folder: checkpoints, metrics.jsonl, validation previews, loss curve;
  3. sample with ComfyUI's KSampler at fixed seeds, without and with the trained LoRA, and measure how close
     each sample is to the album's shared pattern.
There is no tiny text encoder and no tiny VAE, so the toy album is made directly in latent space (8 latents that
share one pattern, captioned with one fixed "TOK" conditioning tensor) and the samples are latents, shown as
previews of three of their 128 channels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "klein_lora_lab"
MODEL_NAME = "tiny_klein.safetensors"
TRIGGER = "TOK"


@dataclass
class DemoReport:
    """What the demo did, written to demo-output/summary.json and printed at the end."""

    comfyui: str
    output_dir: str
    model_file: str = ""
    model_info: str = ""
    training: str = ""
    run_dir: str = ""
    checkpoints: list[str] = field(default_factory=list)
    loss_curve: str = ""
    samples: list[str] = field(default_factory=list)
    distance_to_album: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def find_comfyui() -> Path | None:
    """$COMFYUI_PATH, or the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>)."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env).expanduser()] if env else [PACK_ROOT.parent.parent]
    for root in candidates:
        if (root / "main.py").is_file() and (root / "comfy").is_dir():
            return root.resolve()
    return None


def import_pack() -> None:
    """Import this checkout as `klein_lora_lab`, as ComfyUI imports a custom node folder."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


def import_comfyui(root: Path, cpu: bool) -> None:
    """Make ComfyUI importable in this process without parsing our command line."""
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_api_nodes = True


def write_tiny_klein(models_dir: Path, seed: int) -> Path:
    """Step 1: the embedded tiny Klein as a checkpoint file that ComfyUI's UNETLoader detects as flux2."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein_state_dict
    from safetensors.torch import save_file

    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / MODEL_NAME
    save_file(tiny_klein_state_dict(TinySpec(), seed), str(path), metadata={"klein_lab": "tiny demo model"})
    return path


def load_model(model_file: Path):
    """ComfyUI's UNETLoader on the tiny Klein file; returns (MODEL, model info text)."""
    import folder_paths
    from klein_lora_lab.nodes.loras.model_info import describe_model

    import nodes  # ComfyUI's nodes.py: import_comfyui put ComfyUI's root first on sys.path

    folder_paths.add_model_folder_path("diffusion_models", str(model_file.parent))
    (model,) = nodes.UNETLoader().load_unet(model_file.name, "default")
    return model, describe_model(model.model.diffusion_model)


@dataclass
class ToyAlbum:
    """Latents that share one pattern (what a LoRA should pick up), captioned with one trigger context."""

    items: tuple
    pattern: object  # Tensor [128, h, w]: the shared pattern, unit RMS
    trigger_context: object  # Tensor [tokens, ctx]
    empty_context: object  # Tensor [tokens, ctx]: the empty caption (zeros)


def make_toy_album(size: int, count: int = 8, seed: int = 0) -> ToyAlbum:
    """A generated album in latent space: a smooth shared pattern plus a little per-image variation."""
    import torch
    import torch.nn.functional as F
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning
    from klein_lora_lab.trainer_core.training.data import TrainItem

    h = w = size // 16
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 128, max(1, h // 4), max(1, w // 4), generator=gen)
    pattern = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]  # [128, h, w]
    pattern = pattern / pattern.square().mean().sqrt()
    trigger = tiny_conditioning(TinySpec(), tokens=16, seed=seed + 1)[0]  # [16, ctx]: stands in for "TOK"
    items = tuple(
        TrainItem(pattern + 0.2 * torch.randn(128, h, w, generator=gen), trigger, name=f"toy_{i:02d}")
        for i in range(count)
    )
    return ToyAlbum(items, pattern, trigger, torch.zeros_like(trigger))


def train_lora(model, album: ToyAlbum, output_dir: Path, steps: int) -> tuple[str, object, str]:
    """Step 2: train a LoRA on the MODEL ComfyUI loaded, through the pack's training path.

    Uses the same functions as the Train LoRA node (settings from the "style" preset, a run folder under
    <output>/klein_lora_lab/runs/, ComfyUI glue for training mode, progress and previews). Returns
    (lora name as ComfyUI's loras list shows it, the RunFolder, the trainer's closing message).
    """
    import folder_paths
    import torch
    from klein_lora_lab.nodes.comfy.paths import lora_list_name, register_runs_folder
    from klein_lora_lab.nodes.comfy.train_setup import new_or_resumed_run, sample_config, settings_from_widgets
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.album.latent_cache import EncodedDataset
    from klein_lora_lab.trainer_core.training.data import train_items_hash

    folder_paths.set_output_directory(str(output_dir))
    register_runs_folder()
    encoded = EncodedDataset(
        items=album.items,
        captions=(TRIGGER,) * len(album.items),
        empty_context=album.empty_context,
        validation_prompts=(TRIGGER,),
        validation_contexts=(album.trigger_context,),
        dataset_hash=train_items_hash(album.items),
        trigger=TRIGGER,
        kind="images",
        encoded=len(album.items),
        cached=0,
        seconds=0.0,
    )
    every = max(1, steps // 4)  # checkpoints; previews + validation loss (costly on CPU) at half of that rate
    settings = settings_from_widgets(
        "style",
        rank=8,
        alpha=8.0,
        learning_rate=5e-3,  # the tiny model learns in tens of steps; the course's 3e-4 is for Klein 4B
        steps=steps,
        checkpoint_every=every,
        sample_every=2 * every,
        mixed_precision="fp32",  # CPU
        seed=0,
    )
    run = new_or_resumed_run(time.strftime("demo-%Y%m%d-%H%M%S"), settings, encoded, resume=False)
    with torch.inference_mode():  # as ComfyUI runs a node
        outcome = train_in_comfy(
            model,
            encoded.items,
            settings,
            run,
            False,
            None,
            sample_config(encoded, 8, 1.0, 0),
            album.empty_context,
            None,
        )
    if outcome.checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint: {outcome.message}")
    return lora_list_name(outcome.checkpoint), run, outcome.message


def save_loss_curve(run) -> Path:
    """The run's loss curve (the Loss Curve node's picture) as PNG in the run folder."""
    from klein_lora_lab.trainer_core.analysis.loss_curve import run_loss_curve
    from PIL import Image

    image = run_loss_curve(run, 768, 384, 0.9)[0]  # [H, W, 3] in 0..1
    path = run.path / "loss_curve.png"
    Image.fromarray((image.clamp(0, 1).numpy() * 255).astype("uint8")).save(path)
    return path


def sample(model, context, seeds: list[int], size: int, steps: int, samples_dir: Path, tag: str) -> list:
    """Step 3: ComfyUI's KSampler at fixed seeds; saves each latent and a 3-channel preview; returns latents."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import nodes

    cond = [[context[None], {}]]  # [1, tokens, ctx]
    samples_dir.mkdir(parents=True, exist_ok=True)
    latents = []
    for seed in seeds:
        latent = {"samples": torch.zeros(1, 128, size // 16, size // 16)}  # EmptyFlux2LatentImage
        (out,) = nodes.KSampler().sample(model, seed, steps, 1.0, "euler", "simple", cond, cond, latent)
        z = out["samples"][0]  # [128, h, w]
        save_file({"latent_tensor": z[None].contiguous()}, str(samples_dir / f"{tag}_seed_{seed}.latent.safetensors"))
        rgb = z[:3]
        rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-8)  # channels 0-2, min-max scaled for viewing
        pixels = (rgb.permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(samples_dir / f"{tag}_seed_{seed}.png")
        latents.append(z)
    return latents


def distance_to_pattern(latents: list, pattern) -> float:
    """Mean squared distance between the samples and the album's shared pattern (lower = closer to the album)."""
    return float(sum((z - pattern).square().mean() for z in latents) / len(latents))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "demo-output", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="sampling seeds")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--train-steps", type=int, default=40, help="LoRA training steps")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use a GPU (default: CPU)")
    args = parser.parse_args(argv)
    if args.size % 16 or not 16 <= args.size <= 2048:
        parser.error(f"--size {args.size}: use a multiple of 16 between 16 and 2048")

    root = find_comfyui()
    if root is None:
        print(
            "The demo runs ComfyUI's own loader and sampler, and no ComfyUI was found.\n"
            "  - set COMFYUI_PATH=/path/to/ComfyUI and run again, or\n"
            "  - put this pack in ComfyUI/custom_nodes/, or\n"
            "  - run `bash scripts/demo.sh`, which clones a pinned ComfyUI into .cache/ when the network allows.",
            file=sys.stderr,
        )
        return 2

    import_pack()
    import_comfyui(root, cpu=not args.gpu)
    from klein_lora_lab.nodes.comfy.training import model_with_lora

    out = args.out.resolve()
    report = DemoReport(comfyui=str(root), output_dir=str(out))
    timer = time.perf_counter()

    model_file = write_tiny_klein(out / "models", seed=0)
    model, report.model_info = load_model(model_file)
    report.model_file = str(model_file)
    report.seconds["load_model"] = time.perf_counter() - timer

    timer = time.perf_counter()
    album = make_toy_album(args.size)
    lora_name, run, report.training = train_lora(model, album, out, args.train_steps)
    report.run_dir = str(run.path)
    report.checkpoints = [str(p) for p in run.checkpoints()]
    report.loss_curve = str(save_loss_curve(run))
    report.seconds["train"] = time.perf_counter() - timer

    timer = time.perf_counter()
    trained = model_with_lora(model, lora_name)
    for tag, m in (("base", model), ("lora", trained)):
        latents = sample(m, album.trigger_context, args.seeds, args.size, args.steps, out / "samples", tag)
        report.distance_to_album[tag] = distance_to_pattern(latents, album.pattern)
    report.samples = sorted(str(p) for p in (out / "samples").glob("*.png"))
    report.seconds["sample"] = time.perf_counter() - timer

    (out / "summary.json").write_text(json.dumps(asdict(report), indent=2))
    print_summary(report, args)
    return 0


def print_summary(report: DemoReport, args: argparse.Namespace) -> None:
    s, d = report.seconds, report.distance_to_album
    print("\n=== Klein LoRA Lab demo ===")
    print(f"ComfyUI:  {report.comfyui}")
    print(f"1. Wrote and loaded the embedded tiny Klein ({s['load_model']:.1f} s): {report.model_file}")
    print(f"   {report.model_info.splitlines()[0]}")
    print(f"2. Trained a LoRA on a generated toy album of 8 latents ({s['train']:.1f} s): {report.training}")
    print(f"   run folder: {report.run_dir}")
    print(f"   checkpoints: {len(report.checkpoints)}, loss curve: {report.loss_curve}")
    print(
        f"3. Sampled with ComfyUI's KSampler ({len(args.seeds)} seeds, {args.size}x{args.size} px, {args.steps} steps, "
        f"{s['sample']:.1f} s), without and with the LoRA:"
    )
    print(f"   mean squared distance to the album's pattern: base {d['base']:.3f}, with LoRA {d['lora']:.3f}")
    print("   The base model has random weights and there is no text encoder or VAE: samples are latents, and the")
    print(f"   previews in {Path(report.output_dir) / 'samples'} show 3 of their 128 channels.")
    print(f"Summary: {Path(report.output_dir) / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
