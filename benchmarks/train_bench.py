"""Training speed and memory on full-size random FLUX.2 [klein]: this pack's trainer next to core's TrainLoraNode.

Random weights have the real shapes, so time and memory hold for the real model. Both trainers run in one
process on the same ComfyUI-loaded model (built through ComfyUI's own loader), same rank, resolution, batch,
bf16. Prints one JSON line per measurement and a markdown table at the end.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/train_bench.py --variants 4b --res 512,1024 --ranks 32 \
        --which ours-auto,ours-least,core --cap-gib 12

`first_step_s` is the first step's time, compile included. The Train node keeps inductor's compile cache in
the pack's folder (nodes/comfy/compile_cache.py) unless TORCHINDUCTOR_CACHE_DIR names another; `--compile-cache
DIR` sets that variable for this process, so a cold and a warm first step are two runs with the same DIR, the
first on an empty one (each row records which it was, "compile_cache_state"):

    python benchmarks/train_bench.py --variants 4b --res 1024 --which ours-auto --cap-gib 12 --compute fp8 \
        --compile-cache /tmp/klein-cc    # cold: the folder is new
    python benchmarks/train_bench.py ... the same ... --compile-cache /tmp/klein-cc    # warm

Our rows run the Train node's own path (`nodes/comfy/training.train_in_comfy`, what the node's execute calls)
with Training Options applied; `--cap-gib` limits the process's GPU memory as a smaller card would. Where memory
auto streams base weights from host memory (Klein 9B, fp8 weights, `--cap-gib 10`), "streamed GiB" says how much:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/train_bench.py --variants 9b --res 1024 --which ours-auto \
        --weight-dtype fp8 --compute fp8 --cap-gib 10

FLOPs per step are counted analytically for a LoRA step without recomputation: the forward (2·params·tokens
for the block/global linears plus 4·L²·hidden per block for attention) and a backward that needs input
gradients only (1× the linear FLOPs, 2× the attention FLOPs); LoRA matmuls are ignored (< 1%).
"""

from __future__ import annotations

import argparse
import json
import os
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
    patcher,
    variant: str,
    res: int,
    rank: int,
    batch: int,
    warmup: int,
    steps: int,
    memory: str,
    compile_mode: str,
    algorithm: str = "lora",
    compute: str = "bf16",
) -> dict:
    """This pack's Train node path: `train_in_comfy` (the function the node's execute calls) on the loaded MODEL,
    with the Training Options `memory` ("auto", "fastest", "least memory" or a recompute share), `compile` and
    `algorithm` (lora, rslora, lokr, dora).
    Step times are the trainer's own per-step records in the run's metrics.jsonl; the first `warmup` are dropped.
    """
    import uuid

    import comfy.model_management
    from klein_lora_lab.nodes.comfy.live_panel import peak_vram_gib
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder, runs_dir
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.options import MEMORY_CHOICES, TrainingOptions, with_options
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    # Core's trainer leaves its own reloaded copy resident: unload everything so the peak is ours alone.
    comfy.model_management.unload_all_models()
    torch.cuda.empty_cache()
    items = bench_items(variant, res, batch)
    if memory in MEMORY_CHOICES:
        options = TrainingOptions(memory=memory, compile=compile_mode, algorithm=algorithm, compute=compute)
    else:
        share = float(memory)
        options = TrainingOptions(
            memory="recompute share", recompute_share=share, compile=compile_mode, algorithm=algorithm, compute=compute
        )
    base = TrainSettings(
        rank=rank, alpha=float(rank), steps=warmup + steps, batch_size=batch, checkpoint_every=0, sample_every=0
    )
    settings = with_options(base, options)
    register_runs_folder()
    run = RunFolder.create(runs_dir() / f"bench-{uuid.uuid4().hex[:8]}", settings, {"benchmark": True})
    torch.cuda.reset_peak_memory_stats()
    with _sdpa_backend():
        outcome = train_in_comfy(patcher, items, settings, run, False, None, None, None)
    seconds = [r["seconds"] for r in run.read_metrics() if "seconds" in r]
    plans = [n for n in outcome.notices if n.startswith("memory")]
    return {
        "s_per_step": statistics.median(seconds[warmup:]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "streamed_gib": _streamed_gib(plans),
        "first_step_s": seconds[0],
        "memory_plan": plans,
        "notices": [n for n in outcome.notices if not n.startswith("memory")],
        "panel_peak_vram_gib": peak_vram_gib(),  # what the training panel's peak VRAM field shows
        "fp8_eligible_block_linears": _fp8_eligible(patcher, variant) if compute == "fp8" else None,
    }


def _streamed_gib(plans: list[str]) -> float:
    """GiB of base weights the last memory plan streamed from host memory (0 when none did)."""
    import re

    found = re.search(r"streaming ([\d.]+) GiB", plans[-1]) if plans else None
    return float(found.group(1)) if found else 0.0


def _fp8_eligible(patcher, variant: str) -> str:
    """How many of the blocks' Linears fp8 compute could stand in for, of all (ComfyUI's ops as loaded)."""
    from klein_lora_lab.trainer_core.model.fp8_compute import fp8_eligible

    model = patcher.model.diffusion_model
    x = torch.zeros(1, VARIANTS[variant][0], device="cuda")
    linears = [m for b in (*model.double_blocks, *model.single_blocks) for m in b.modules()]
    linears = [m for m in linears if isinstance(m, torch.nn.Linear)]
    flags = [(m.weight, m.weight.requires_grad) for m in linears]
    try:
        for w, _ in flags:
            w.requires_grad_(False)
        return f"{sum(fp8_eligible(m, x) for m in linears)} of {len(linears)}"
    finally:
        for w, flag in flags:
            w.requires_grad_(flag)


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


def _cap(gib: float) -> None:
    """Cap this process's share of the GPU's memory (0 = the whole GPU), as a smaller card would."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total) if gib > 0 else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="4b")
    parser.add_argument("--res", default="512,1024")
    parser.add_argument("--ranks", default="32")
    parser.add_argument("--batches", default="1")
    parser.add_argument(
        "--which",
        default="ours-auto,core",
        help="ours-auto, ours-fastest, ours-least, ours-<share of blocks recomputed>, core (comma-separated)",
    )
    parser.add_argument(
        "--cap-gib",
        type=float,
        default=0.0,
        help="limit this process's GPU memory for our rows (torch.cuda.set_per_process_memory_fraction); 0 = none",
    )
    parser.add_argument("--core-depth", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--jsonl", type=Path, default=None)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp"), help="where the random model file is written")
    parser.add_argument("--sdpa", choices=("default", "cudnn", "flash"), default="default")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="Training Options' compile")
    parser.add_argument("--weight-dtype", choices=sorted(WEIGHT_DTYPES), default="bf16", help="base weights")
    parser.add_argument("--algorithm", default="lora", help="our rows' adapter: lora, rslora, lokr or dora")
    parser.add_argument("--compute", choices=("bf16", "fp8"), default="bf16", help="Training Options' compute")
    parser.add_argument("--fp8-scaling", choices=("rowwise", "tensor"), default="rowwise", help="fp8 compute's scales")
    parser.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="inductor's compile cache folder for this process (TORCHINDUCTOR_CACHE_DIR; Triton's kernels go under "
        "it too): a new folder gives a cold first step, the same folder again a warm one; default: the pack's folder",
    )
    parser.add_argument("--table", type=Path, default=None, help="only print the docs table of these JSON lines")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown_table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    cache_state = use_compile_cache(args.compile_cache) if args.compile_cache is not None else None
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
    from klein_lora_lab.trainer_core.model import fp8_compute

    fp8_compute.CUDA_ROWWISE = args.fp8_scaling == "rowwise"
    import folder_paths
    from klein_lora_lab.trainer_core.training.faults import TrainingOutOfMemoryError

    folder_paths.set_output_directory(str(args.model_dir / "comfy_output"))
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
                                mode = which.partition("-")[2] or "auto"
                                memory = {"least": "least memory"}.get(mode, mode)
                                _cap(args.cap_gib)
                                r = bench_ours(
                                    patcher,
                                    variant,
                                    res,
                                    rank,
                                    batch,
                                    args.warmup,
                                    args.steps,
                                    memory,
                                    args.compile,
                                    args.algorithm,
                                    args.compute,
                                )
                            else:
                                r = bench_core(
                                    patcher, variant, res, rank, batch, args.warmup, args.steps, args.core_depth
                                )
                        except (torch.OutOfMemoryError, TrainingOutOfMemoryError) as err:
                            r = {"s_per_step": float("nan"), "peak_gib": float("nan"), "error": f"OOM: {err}"[:200]}
                        finally:
                            _cap(0.0)
                        torch.cuda.empty_cache()
                        flops = step_flops(variant, res, batch)
                        row = {
                            "gpu": gpu,
                            "trainer": which
                            + ("" if args.sdpa == "default" else f"/{args.sdpa}")
                            + (f"/compile-{args.compile}" if which.startswith("ours") else "")
                            + (f"/{args.algorithm}" if which.startswith("ours") and args.algorithm != "lora" else "")
                            + ("/fp8-weights" if args.weight_dtype == "fp8" else "")
                            + ("/fp8-compute" if args.compute == "fp8" and which.startswith("ours") else "")
                            + ("/tensor-scaled" if args.compute == "fp8" and args.fp8_scaling == "tensor" else ""),
                            "cap_gib": args.cap_gib if which.startswith("ours") else 0.0,
                            "variant": variant,
                            "res": res,
                            "rank": rank,
                            "batch": batch,
                            **({"compile_cache_state": cache_state} if cache_state else {}),
                            **r,
                            "images_per_s": batch / r["s_per_step"],
                            "tflops": flops / r["s_per_step"] / 1e12,
                            "mfu_vs_peak": flops / r["s_per_step"] / 1e12 / peak,
                        }
                        if which.startswith("ours") and args.compile != "off":
                            row["compile"] = compile_report()
                        rows.append(row)
                        line = json.dumps(row)
                        print(line, flush=True)
                        if args.jsonl:
                            with args.jsonl.open("a") as fh:
                                fh.write(line + "\n")
        del patcher
        torch.cuda.empty_cache()
    print(markdown_table(rows))


def compile_report() -> dict:
    """Where this process's compile time went so far: seconds per compile phase torch records (Dynamo tracing,
    AOTAutograd, inductor's codegen, cache lookups and loads; phases nest, so they do not add up) and the cache
    counters (inductor's FX graph cache and AOTAutograd's cache: hits, misses, bypasses)."""
    from torch._dynamo import utils

    seconds = {name: round(sum(times), 3) for name, times in utils.compilation_time_metrics.items()}
    counters = {
        f"{group}.{name}": count
        for group in ("inductor", "aot_autograd", "stats")
        for name, count in utils.counters[group].items()
        if "cache" in name or "hit" in name or "miss" in name or name in ("unique_graphs", "calls_captured")
    }
    return {"seconds": seconds, "counters": counters}


def use_compile_cache(folder: Path) -> str:
    """Point inductor's cache (and Triton's, which lives under it unless TRITON_CACHE_DIR is set) at `folder`
    for this process, before anything compiles; the pack keeps a folder set this way. Returns "cold" when the
    folder is new or empty, else "warm"."""
    folder = folder.resolve()
    state = "warm" if folder.is_dir() and any(folder.iterdir()) else "cold"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return state


def markdown_table(rows: list[dict]) -> str:
    """The docs table from benchmark rows (the JSON lines this script prints)."""
    lines = [
        "| trainer | variant | res | batch | cap GiB | s/step | peak GiB | streamed GiB | img/s | TFLOP/s "
        "| first step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = f"{r['cap_gib']:g}" if r.get("cap_gib") else "—"
        first = f"{r['first_step_s']:.1f}" if "first_step_s" in r else "—"
        streamed = f"{r['streamed_gib']:.1f}" if r.get("streamed_gib") else "—"
        if "compile_cache_state" in r and "first_step_s" in r:
            first += f" ({r['compile_cache_state']})"
        lines.append(
            f"| {r['trainer']} | {r['variant']} | {r['res']}² | {r['batch']} | {cap} | {r['s_per_step']:.3f} | "
            f"{r['peak_gib']:.1f} | {streamed} | {r['images_per_s']:.2f} | {r['tflops']:.0f} | {first} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
