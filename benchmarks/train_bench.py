"""Training speed and memory on full-size random FLUX.2 [klein]: this pack's trainer next to core's TrainLoraNode.

Random weights have the real shapes, so time and memory hold for the real model. Both trainers run in one
process on the same ComfyUI-loaded model (built through ComfyUI's own loader), same rank, resolution, batch,
bf16. Prints one JSON line per measurement and a markdown table at the end.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/train_bench.py --variants 4b --res 512,1024 --ranks 32

FLOPs per step are counted analytically for a LoRA step without recomputation: the forward (2·params·tokens
for the block/global linears plus 4·L²·hidden per block for attention) and a backward that needs input
gradients only (1× the linear FLOPs, 2× the attention FLOPs); LoRA matmuls are ignored (< 1%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.comfy_env import comfy_path, import_comfy_inprocess  # noqa: E402
from harness.pack import register_pack  # noqa: E402

VARIANTS = {"4b": (3072, 5, 20, 7680), "9b": (4096, 8, 24, 12288)}
TEXT_TOKENS = 512  # Klein pads text to 512 tokens
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 spec sheet; ~790 measured on matmuls


def random_klein_state_dict(variant: str, device: str) -> dict[str, torch.Tensor]:
    """Checkpoint-style keys of a full-size Klein, random bf16 values made directly on `device`."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, random_checkpoint

    hidden, double, single, ctx = VARIANTS[variant]
    return random_checkpoint(
        TinySpec(hidden=hidden, double_blocks=double, single_blocks=single, context_dim=ctx), device
    )


def bench_items(variant: str, res: int, count: int) -> list:
    """`count` fixed random training items (latent + 512-token context) on the GPU."""
    from klein_lora_lab.trainer_core.training.data import TrainItem

    gen = torch.Generator().manual_seed(0)
    return [
        TrainItem(
            torch.randn(128, res // 16, res // 16, generator=gen).cuda(),
            torch.randn(TEXT_TOKENS, VARIANTS[variant][3], generator=gen).cuda(),
            name=f"item{i}",
        )
        for i in range(count)
    ]


def load_klein(variant: str, folder: Path, weight_dtype: torch.dtype = torch.bfloat16):
    """Write the random model to disk and load it with ComfyUI's own loader (core's trainer reloads from disk).
    weight_dtype float8_e4m3fn stores the base weights in fp8 as UNETLoader's weight_dtype option does."""
    import comfy.model_management
    import comfy.sd
    from safetensors.torch import save_file

    path = folder / f"klein-{variant}-random-bf16.safetensors"
    if not path.exists():
        sd = {k: v.cpu() for k, v in random_klein_state_dict(variant, "cuda").items()}
        save_file(sd, str(path))
        del sd
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": weight_dtype})
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher


def step_flops(variant: str, res: int, batch: int) -> float:
    hidden, double, single, ctx = VARIANTS[variant]
    tokens = (res // 16) ** 2 + TEXT_TOKENS
    linear_params = double * 2 * 13 * hidden**2 + single * 13 * hidden**2  # qkv+proj+mlp, per stream
    linear = 2 * linear_params * tokens
    attention = (double + single) * 4 * tokens**2 * hidden
    return batch * (linear + attention) * 2 + batch * attention  # fwd + bwd(input grads: 1x linear, 2x attn)


SDPA_BACKEND = {"name": "default"}
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def _sdpa_backend():
    """The attention kernel chosen with --sdpa (default: PyTorch's own choice)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = SDPA_BACKEND["name"]
    if name == "default":
        return contextlib.nullcontext()
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def bench_ours(
    patcher, variant: str, res: int, rank: int, batch: int, warmup: int, steps: int, share: float, compiled: bool
) -> dict:
    """This pack's trainer (trainer_core.trainer.train) on the loaded model; the first `warmup` steps are dropped."""
    import tempfile

    import comfy.model_management
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train

    # Core's trainer leaves its own reloaded copy resident: unload everything so the peak is ours alone.
    comfy.model_management.unload_all_models()
    torch.cuda.empty_cache()
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    items = bench_items(variant, res, batch)
    settings = TrainSettings(
        rank=rank,
        alpha=float(rank),
        steps=warmup + steps,
        batch_size=batch,
        checkpoint_every=0,
        gradient_checkpointing=share > 0,
        checkpoint_share=share if share > 0 else 1.0,
        compile_blocks="on" if compiled else "off",
    )

    class StepTimes(TrainCallbacks):
        """Per-step wall times reported by the trainer (each includes the step's one host sync)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
            self.seconds.append(seconds)

    times = StepTimes()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, _sdpa_backend():
        run = RunFolder.create(Path(tmp) / "run", settings, {"benchmark": True})
        train(patcher.model.diffusion_model, items, settings, run, times, device="cuda")
    return {
        "s_per_step": statistics.median(times.seconds[warmup:]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def bench_core(patcher, variant: str, res: int, rank: int, batch: int, warmup: int, steps: int, depth: int) -> dict:
    """Core's TrainLoraNode on the same model: time(warmup+steps) − time(warmup), per step."""
    import comfy.model_management
    import comfy_extras.nodes_train as nt

    ctx = torch.randn(1, TEXT_TOKENS, VARIANTS[variant][3])
    latents = {"samples": torch.randn(batch, 128, res // 16, res // 16)}

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(False):
            nt.TrainLoraNode.execute(
                model=[patcher],
                latents=[latents],
                positive=[[[ctx, {}]]],
                batch_size=[batch],
                steps=[n],
                grad_accumulation_steps=[1],
                learning_rate=[1e-4],
                rank=[rank],
                optimizer=["AdamW"],
                loss_function=["MSE"],
                seed=[0],
                training_dtype=["bf16"],
                lora_dtype=["bf16"],
                quantized_backward=[False],
                algorithm=["LoRA"],
                gradient_checkpointing=[True],
                checkpoint_depth=[depth],
                offloading=[False],
                existing_lora=["[None]"],
                bucket_mode=[False],
                bypass_mode=[False],
            )
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    comfy.model_management.unload_all_models()
    torch.cuda.empty_cache()
    run(warmup)
    torch.cuda.reset_peak_memory_stats()
    t_short = run(warmup)
    t_long = run(warmup + steps)
    return {"s_per_step": (t_long - t_short) / steps, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="4b")
    parser.add_argument("--res", default="512,1024")
    parser.add_argument("--ranks", default="32")
    parser.add_argument("--batches", default="1")
    parser.add_argument(
        "--which",
        default="ours-off,ours-full,core",
        help="ours-off, ours-full, ours-<share of blocks checkpointed>, core",
    )
    parser.add_argument("--core-depth", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--jsonl", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp"), help="where the random model file is written")
    parser.add_argument("--sdpa", choices=("default", "cudnn", "flash"), default="default")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (fuses element-wise ops)")
    parser.add_argument("--weight-dtype", choices=sorted(WEIGHT_DTYPES), default="bf16", help="base weights")
    args = parser.parse_args()
    SDPA_BACKEND["name"] = args.sdpa

    root = comfy_path()
    if root is None:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    import_comfy_inprocess(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = False
    register_pack()
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), 989.0)
    rows = []
    for variant in args.variants.split(","):
        patcher = load_klein(variant, args.model_dir, WEIGHT_DTYPES[args.weight_dtype])
        for res in map(int, args.res.split(",")):
            for rank in map(int, args.ranks.split(",")):
                for batch in map(int, args.batches.split(",")):
                    for which in args.which.split(","):
                        try:
                            if which.startswith("ours"):
                                mode = which.partition("-")[2] or "full"
                                share = {"off": 0.0, "full": 1.0}[mode] if mode in ("off", "full") else float(mode)
                                r = bench_ours(
                                    patcher, variant, res, rank, batch, args.warmup, args.steps, share, args.compile
                                )
                            else:
                                r = bench_core(
                                    patcher, variant, res, rank, batch, args.warmup, args.steps, args.core_depth
                                )
                        except torch.OutOfMemoryError as err:
                            r = {"s_per_step": float("nan"), "peak_gib": float("nan"), "error": f"OOM: {err}"[:200]}
                        torch.cuda.empty_cache()
                        flops = step_flops(variant, res, batch)
                        row = {
                            "gpu": gpu,
                            "trainer": which
                            + ("" if args.sdpa == "default" else f"/{args.sdpa}")
                            + ("/compiled" if args.compile and which.startswith("ours") else "")
                            + ("/fp8-weights" if args.weight_dtype == "fp8" else ""),
                            "variant": variant,
                            "res": res,
                            "rank": rank,
                            "batch": batch,
                            **r,
                            "images_per_s": batch / r["s_per_step"],
                            "tflops": flops / r["s_per_step"] / 1e12,
                            "mfu_vs_peak": flops / r["s_per_step"] / 1e12 / peak,
                        }
                        rows.append(row)
                        line = json.dumps(row)
                        print(line, flush=True)
                        if args.jsonl:
                            with args.jsonl.open("a") as fh:
                                fh.write(line + "\n")
        del patcher
        torch.cuda.empty_cache()
    print("\n| trainer | variant | res | rank | batch | s/step | peak GiB | img/s | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['trainer']} | {r['variant']} | {r['res']} | {r['rank']} | {r['batch']} | {r['s_per_step']:.3f} | "
            f"{r['peak_gib']:.1f} | {r['images_per_s']:.2f} | {r['tflops']:.0f} |"
        )


if __name__ == "__main__":
    main()
