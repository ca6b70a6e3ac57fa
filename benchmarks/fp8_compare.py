"""Low-memory training with fp8 base weights, next to bf16: speed, peak memory, and whether the run learns the same.

ComfyUI loads the random full-size Klein with fp8 (e4m3fn) weights when asked (`model_options["dtype"]`, what
UNETLoader's weight_dtype does); its Linears cast each weight to bf16 per call, and this pack's trainer runs on
that model unchanged. Prints one JSON line per measurement, then the two loss curves side by side and how
close the learned LoRAs are (cosine similarity of each module's ΔW = B·A, and of the LoRA output on the same
input).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/fp8_compare.py --variant 4b --res 1024 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench import VARIANTS, bench_items, random_klein_state_dict  # noqa: E402


def load(variant: str, folder: Path, dtype: torch.dtype):
    import comfy.model_management
    import comfy.sd
    from safetensors.torch import save_file

    path = folder / f"klein-{variant}-random-bf16.safetensors"
    if not path.exists():
        save_file({k: v.cpu() for k, v in random_klein_state_dict(variant, "cuda").items()}, str(path))
    comfy.model_management.unload_all_models()
    torch.cuda.empty_cache()
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher


def run(patcher, variant: str, res: int, steps: int, share: float, compiled: bool) -> dict:
    """A fixed short training run (same seed, same data for every weight dtype)."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train

    items = bench_items(variant, res, 4)
    settings = TrainSettings(
        rank=32,
        alpha=32.0,
        learning_rate=2e-4,
        steps=steps,
        checkpoint_every=0,
        gradient_checkpointing=share > 0,
        checkpoint_share=share if share > 0 else 1.0,
        compile_blocks="on" if compiled else "off",
    )

    class Record(TrainCallbacks):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.seconds: list[float] = []

        def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
            self.losses.append(loss)
            self.seconds.append(seconds)

    record = Record()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder.create(Path(tmp) / "run", settings, {"benchmark": True})
        result = train(patcher.model.diffusion_model, items, settings, folder, record, device="cuda")
    return {
        "losses": record.losses,
        "s_per_step": statistics.median(record.seconds[3:]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "weights": result.lora.weights(),
    }


def lora_similarity(a: dict, b: dict) -> tuple[float, float]:
    """Mean and minimum over modules of the cosine similarity of ΔW = B·A between two learned LoRAs."""
    sims = []
    for name, wa in a.items():
        da, db = wa.delta_weight().flatten(), b[name].delta_weight().flatten()
        sims.append(torch.nn.functional.cosine_similarity(da, db, dim=0).item())
    return statistics.mean(sims), min(sims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="4b", choices=sorted(VARIANTS))
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--share", type=float, default=1.0, help="share of blocks checkpointed (1.0 = all)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from harness.comfy_env import comfy_path, import_comfy_inprocess
    from harness.pack import register_pack

    root = comfy_path()
    if root is None or not torch.cuda.is_available():
        raise SystemExit("needs COMFYUI_PATH and a CUDA GPU")
    import_comfy_inprocess(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = False
    register_pack()

    results = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        patcher = load(args.variant, args.model_dir, dtype)
        results[label] = run(patcher, args.variant, args.res, args.steps, args.share, args.compile)
        row = {k: v for k, v in results[label].items() if k not in ("weights", "losses")}
        print(json.dumps({"variant": args.variant, "res": args.res, "weights": label, "share": args.share, **row}))
        del patcher
    bf16, fp8 = results["bf16"], results["fp8"]
    print("\n| step | loss bf16 weights | loss fp8 weights |\n|---|---|---|")
    for i, (x, y) in enumerate(zip(bf16["losses"], fp8["losses"], strict=True)):
        if i % 5 == 4 or i == 0:
            print(f"| {i + 1} | {x:.4f} | {y:.4f} |")
    diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(bf16["losses"], fp8["losses"], strict=True)]
    mean_sim, min_sim = lora_similarity(bf16["weights"], fp8["weights"])
    print(
        f"\nloss relative difference: mean {statistics.mean(diffs):.4f}, max {max(diffs):.4f}; "
        f"learned ΔW cosine similarity: mean {mean_sim:.4f}, min {min_sim:.4f}"
    )
    print(
        f"speed: bf16 {bf16['s_per_step']:.3f} s/step, {bf16['peak_gib']:.1f} GiB; "
        f"fp8 {fp8['s_per_step']:.3f} s/step, {fp8['peak_gib']:.1f} GiB"
    )


if __name__ == "__main__":
    main()
