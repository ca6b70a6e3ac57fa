"""Where a training step's time goes on full-size random Klein: GPU time by kind of kernel (matmul, attention,
fused element-wise, other element-wise, copies) and host syncs, for a memory mode. Prints one JSON line.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/profile_step.py --variant 4b --res 1024 --memory auto
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/profile_step.py --variant 4b --res 1024 --memory fastest \
        --compute fp8 --kernels 25

Runs the trainer the Train node runs (`trainer_core.training.trainer.train`, with the Training Options applied)
and profiles `--steps` steps after `--warmup` (torch.profiler, CUDA activity). Recompute is the difference
between the same run with every block recomputed and with none (train_bench rows).

`--kernels N` also lists the N GPU kernels with the most time (name, kind, calls and ms per step) and, under
each, the operators that launched it with their input shapes (the profiler records shapes then): a matmul
kernel's shapes say which matmul it is, e.g. for Klein 4B at 1024² (4608 tokens, rank 32) [4608, 3072] ×
[3072, 32] is a LoRA down projection, [32, 4608] × [4608, 3072] a LoRA weight gradient, aten::_scaled_mm
an fp8 frozen matmul. Kernels launched by compiled code name the compiled graph instead. The listing goes into
the JSON line as "kernels".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench import WEIGHT_DTYPES, bench_items, load_klein  # noqa: E402

KINDS = (
    ("fp8 matmul", ("f8f8", "e4m3", "fp8", "float8", "scaled_mm")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "addmm")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("fused element-wise (compiled)", ("triton",)),
    ("copies", ("memcpy", "memset", "copy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other element-wise"


def kernel_listing(events, steps: int, top: int, sources: int = 4) -> list[dict]:
    """The `top` GPU kernels by total time in profiler `events` (torch.profiler's FunctionEvents) as rows of
    name, kind, calls and ms per step, each with its `sources`: the operators (with input shapes) that launched
    it, most time first. A kernel is attributed to the innermost operator or range open when it was launched
    (the profiler's correlation of the CPU op and its kernels); "(not attributed)" holds the rest."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # name -> [us, calls]
    for evt in events:
        if evt.device_type == torch.autograd.DeviceType.CUDA and not _is_range(evt):
            totals[evt.name][0] += evt.time_range.elapsed_us()
            totals[evt.name][1] += 1
    by_source: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        for kernel in getattr(evt, "kernels", ()):
            if kernel.name in totals:
                shapes = [s for s in (evt.input_shapes or []) if s]
                source = evt.name + (f" {shapes}" if shapes else "")
                by_source[kernel.name][source][0] += kernel.duration
                by_source[kernel.name][source][1] += 1
    all_us = sum(us for us, _ in totals.values()) or 1.0
    rows = []
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        found = by_source.get(name, {})
        rest_us, rest_calls = us - sum(v[0] for v in found.values()), calls - sum(v[1] for v in found.values())
        listed = sorted(found.items(), key=lambda kv: -kv[1][0])
        if rest_calls > 0:
            listed.append(("(not attributed)", [rest_us, rest_calls]))
        rows.append(
            {
                "name": name,
                "kind": kind_of(name),
                "calls_per_step": calls / steps,
                "ms_per_step": us / steps / 1e3,
                "share": us / all_us,
                "sources": [
                    {"source": src, "calls_per_step": n / steps, "ms_per_step": t / steps / 1e3}
                    for src, (t, n) in listed[:sources]
                ],
            }
        )
    return rows


def print_kernels(rows: list[dict], width: int = 110) -> None:
    """The kernel listing as text: one line per kernel, its launching operators indented below it."""
    print(f"{'ms/step':>8} {'calls':>6} {'share':>6}  kind / kernel")
    for r in rows:
        print(f"{r['ms_per_step']:8.2f} {r['calls_per_step']:6.1f} {r['share']:6.1%}  {r['kind']}: {r['name'][:width]}")
        for src in r["sources"]:
            print(f"{src['ms_per_step']:8.2f} {src['calls_per_step']:6.1f} {'':6}    <- {src['source'][:width]}")


def _is_range(evt) -> bool:
    name = evt.name
    return bool(getattr(evt, "is_user_annotation", False)) or name.startswith(("##", "Torch-Compiled", "Compiled"))


def profile(
    patcher, variant: str, res: int, memory: str, warmup: int, steps: int, compute: str = "bf16", kernels: int = 0
) -> dict:
    """One JSON-able row: GPU ms per step by kind of kernel, host syncs and, with `kernels` > 0, the listing of
    the top kernels (`kernel_listing`; input shapes are recorded only then)."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.options import TrainingOptions, with_options
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train
    from torch.profiler import ProfilerActivity, schedule

    settings = with_options(
        TrainSettings(rank=32, alpha=32.0, steps=warmup + steps + 1, checkpoint_every=0),
        TrainingOptions(memory=memory, compute=compute),
    )
    prof = torch.profiler.profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
        schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
        record_shapes=kernels > 0,
    )

    class Step(TrainCallbacks):
        def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
            prof.step()

    with tempfile.TemporaryDirectory() as tmp, prof:
        run = RunFolder.create(Path(tmp) / "run", settings, {})
        train(patcher.model.diffusion_model, bench_items(variant, res, 1), settings, run, Step(), device="cuda")
    gpu: dict[str, float] = defaultdict(float)
    host_sync = 0.0
    for evt in prof.events():
        # Kernels only: GPU-side ranges of compiled regions and user annotations span kernels counted already.
        if evt.device_type == torch.autograd.DeviceType.CUDA and not _is_range(evt):
            gpu[kind_of(evt.name)] += evt.time_range.elapsed_us()
        elif "synchronize" in evt.name.lower():
            host_sync += evt.cpu_time
    total = sum(gpu.values())
    row = {
        "variant": variant,
        "res": res,
        "memory": memory,
        "compute": compute,
        "gpu_ms_per_step": total / steps / 1e3,
        "share": {k: v / total for k, v in sorted(gpu.items(), key=lambda kv: -kv[1])},
        "host_sync_ms_per_step": host_sync / steps / 1e3,
    }
    if kernels > 0:
        row["kernels"] = kernel_listing(prof.events(), steps, kernels)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="4b")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--memory", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--weight-dtype", choices=sorted(WEIGHT_DTYPES), default="bf16")
    parser.add_argument("--compute", choices=("bf16", "fp8"), default="bf16", help="Training Options' compute")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--jsonl", type=Path, default=None)
    parser.add_argument(
        "--kernels",
        type=int,
        default=0,
        help="also list the N GPU kernels with the most time, with the operators and shapes that launched them",
    )
    args = parser.parse_args()
    from harness.comfy_env import comfy_path, import_comfy_inprocess
    from harness.pack import register_pack

    import_comfy_inprocess(comfy_path())
    import comfy.cli_args

    comfy.cli_args.args.cpu = False
    register_pack()
    patcher = load_klein(args.variant, args.model_dir, WEIGHT_DTYPES[args.weight_dtype])
    row = profile(patcher, args.variant, args.res, args.memory, args.warmup, args.steps, args.compute, args.kernels)
    if args.kernels > 0:
        print_kernels(row["kernels"])
    line = json.dumps(row)
    print(line, flush=True)
    if args.jsonl:
        with args.jsonl.open("a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
