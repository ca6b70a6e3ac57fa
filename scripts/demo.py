"""The Klein LoRA Lab demo, run by `bash scripts/demo.sh`: what the pack does today, end to end, on this machine.

It needs a ComfyUI checkout (COMFYUI_PATH, the ComfyUI this pack sits in, or the one scripts/setup.sh cloned).
Steps, each reported in the summary:
  1. write the embedded tiny Klein (a randomly initialised FLUX.2 [klein]-shaped diffusion model, a few MB) as
     safetensors, the way a real Klein checkpoint is stored;
  2. train a LoRA on it (`train_lora`): not wired into the demo yet, and said so; nothing is faked;
  3. load the model with ComfyUI's own UNETLoader and sample it with ComfyUI's KSampler at fixed seeds.
There is no tiny text encoder, so the prompt is a fixed random conditioning tensor; with random weights the
samples are noise-like latents, shown as previews of three of their 128 channels.
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


@dataclass
class DemoReport:
    """What the demo did, written to demo-output/summary.json and printed at the end."""

    comfyui: str
    output_dir: str
    model_file: str = ""
    model_info: str = ""
    training: str = ""
    samples: list[str] = field(default_factory=list)
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
    from klein_lora_lab.trainer_core.tiny import TinySpec, tiny_klein_state_dict
    from safetensors.torch import save_file

    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / MODEL_NAME
    save_file(tiny_klein_state_dict(TinySpec(), seed), str(path), metadata={"klein_lab": "tiny demo model"})
    return path


def train_lora(model_file: Path, run_dir: Path) -> tuple[Path | None, str]:
    """Step 2: train a LoRA on the tiny Klein with a generated toy album; returns (checkpoint, what happened).

    The demo does not run training yet, so this step does nothing and says so. Training plugs in here: build
    the toy album, train into `run_dir` (checkpoints/, metrics.jsonl, samples/) and return the last
    checkpoint; `sample` then also shows the LoRA's effect.
    """
    return None, "not run: this demo does not train a LoRA yet (the step plugs in at train_lora in scripts/demo.py)."


def sample(model_file: Path, seeds: list[int], size: int, steps: int, samples_dir: Path) -> tuple[list[Path], str]:
    """Step 3: ComfyUI's UNETLoader + KSampler on the tiny Klein; saves latents and channel previews."""
    import folder_paths
    import torch
    from klein_lora_lab.nodes.model_info import describe_model
    from klein_lora_lab.trainer_core.tiny import TinySpec, tiny_conditioning
    from PIL import Image
    from safetensors.torch import save_file

    import nodes  # ComfyUI's nodes.py: import_comfyui put ComfyUI's root first on sys.path

    folder_paths.add_model_folder_path("diffusion_models", str(model_file.parent))
    (model,) = nodes.UNETLoader().load_unet(model_file.name, "default")
    info = describe_model(model.model.diffusion_model)
    cond = [[tiny_conditioning(TinySpec(), tokens=16), {}]]  # a fixed stand-in for encoded text
    samples_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in seeds:
        latent = {"samples": torch.zeros(1, 128, size // 16, size // 16)}  # EmptyFlux2LatentImage
        (out,) = nodes.KSampler().sample(model, seed, steps, 1.0, "euler", "simple", cond, cond, latent)
        z = out["samples"][0]  # [128, h, w]
        save_file({"latent_tensor": z[None].contiguous()}, str(samples_dir / f"seed_{seed}.latent.safetensors"))
        rgb = z[:3]
        rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-8)  # channels 0-2, min-max scaled for viewing
        pixels = (rgb.permute(1, 2, 0).numpy() * 255).astype("uint8")
        preview = samples_dir / f"seed_{seed}.preview.png"
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(preview)
        written.append(preview)
    return written, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "demo-output", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="sampling seeds")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
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
    out = args.out.resolve()
    report = DemoReport(comfyui=str(root), output_dir=str(out))

    start = time.perf_counter()
    model_file = write_tiny_klein(out / "models", seed=0)
    report.model_file, report.seconds["write_model"] = str(model_file), time.perf_counter() - start

    start = time.perf_counter()
    _, report.training = train_lora(model_file, out / "run")
    report.seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    previews, report.model_info = sample(model_file, args.seeds, args.size, args.steps, out / "samples")
    report.samples, report.seconds["sample"] = [str(p) for p in previews], time.perf_counter() - start

    (out / "summary.json").write_text(json.dumps(asdict(report), indent=2))
    print_summary(report, args)
    return 0


def print_summary(report: DemoReport, args: argparse.Namespace) -> None:
    s = report.seconds
    print("\n=== Klein LoRA Lab demo ===")
    print(f"ComfyUI:  {report.comfyui}")
    print(f"1. Wrote the embedded tiny Klein model ({s['write_model']:.1f} s): {report.model_file}")
    print(f"   {report.model_info.splitlines()[0]}")
    print(f"2. Training: {report.training}")
    print(
        f"3. Sampled with ComfyUI's UNETLoader + KSampler: {len(report.samples)} seeds, {args.size}x{args.size} px, "
        f"{args.steps} steps ({s['sample']:.1f} s)"
    )
    print("   The model has random weights and no text encoder: the samples are latents, not pictures; the")
    print("   previews show 3 of their 128 channels.")
    for path in report.samples:
        print(f"   {path}")
    print(f"Summary: {Path(report.output_dir) / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
