"""Where a training step's time goes on full-size random Klein: GPU time by kind of kernel (matmul, attention,
fused element-wise, other element-wise, copies) and host syncs, for a memory mode. Prints one JSON line.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/profile_step.py --variant 4b --res 1024 --memory auto

Runs the trainer the Train node runs (`trainer_core.training.trainer.train`, with the Training Options applied)
and profiles `--steps` steps after `--warmup` (torch.profiler, CUDA activity). Recompute is the difference
between the same run with every block recomputed and with none (train_bench rows).
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


def _is_range(evt) -> bool:
    name = evt.name
    return bool(getattr(evt, "is_user_annotation", False)) or name.startswith(("##", "Torch-Compiled", "Compiled"))


def profile(patcher, variant: str, res: int, memory: str, warmup: int, steps: int, compute: str = "bf16") -> dict:
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
    return {
        "variant": variant,
        "res": res,
        "memory": memory,
        "compute": compute,
        "gpu_ms_per_step": total / steps / 1e3,
        "share": {k: v / total for k, v in sorted(gpu.items(), key=lambda kv: -kv[1])},
        "host_sync_ms_per_step": host_sync / steps / 1e3,
    }


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
    args = parser.parse_args()
    from harness.comfy_env import comfy_path, import_comfy_inprocess
    from harness.pack import register_pack

    import_comfy_inprocess(comfy_path())
    import comfy.cli_args

    comfy.cli_args.args.cpu = False
    register_pack()
    patcher = load_klein(args.variant, args.model_dir, WEIGHT_DTYPES[args.weight_dtype])
    row = profile(patcher, args.variant, args.res, args.memory, args.warmup, args.steps, args.compute)
    line = json.dumps(row)
    print(line, flush=True)
    if args.jsonl:
        with args.jsonl.open("a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
