"""Seconds per training step and adapter size of each algorithm (lora, rslora, lokr, dora) through the trainer.

Runs `trainer_core.training.trainer.train` on a seeded tiny Klein (CPU by default; `--device cuda` on a GPU,
where the peak allocated memory is printed too). Every run trains the same items with the same seed, rank and
targets; the first `--warmup` steps are left out of the median. Prints one JSON line per algorithm and a
markdown table.

    python benchmarks/algorithm_bench.py --hidden 256 --double 2 --single 4 --steps 12 --rank 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.pack import register_pack  # noqa: E402

ALGORITHMS = ("lora", "rslora", "lokr", "dora")


def bench(args: argparse.Namespace, algorithm: str) -> dict:
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train

    spec = TinySpec(hidden=args.hidden, double_blocks=args.double, single_blocks=args.single, context_dim=64)
    model = tiny_klein(spec).to(args.device)
    g = torch.Generator().manual_seed(0)
    side = args.latent
    items = [
        TrainItem(torch.randn(128, side, side, generator=g), torch.randn(32, 64, generator=g), name=f"i{i}")
        for i in range(4)
    ]
    settings = TrainSettings(
        rank=args.rank,
        alpha=args.rank,
        steps=args.steps,
        checkpoint_every=0,
        targets=args.targets,
        algorithm=algorithm,
        compile_blocks="off",
        memory_mode="fastest",
    )

    class Times(TrainCallbacks):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
            self.seconds.append(seconds)

    times = Times()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder.create(Path(tmp) / "run", settings, {})
        result = train(model, items, settings, run, times, device=args.device)
    params = sum(p.numel() for p in result.lora.parameters())
    row = {
        "algorithm": algorithm,
        "device": args.device,
        "s_per_step": statistics.median(times.seconds[args.warmup :]),
        "adapter_params": params,
        "adapter_and_adam_mib": params * 4 * 3 / 2**20,  # fp32 weights + two AdamW moments
        "final_loss": result.final_loss,
    }
    if args.device == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--latent", type=int, default=16, help="latent side (16 = a 256 px image)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all_linear")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    args = parser.parse_args()
    register_pack()
    torch.manual_seed(0)
    rows = []
    for algorithm in args.algorithms.split(","):
        row = bench(args, algorithm)
        print(json.dumps(row), flush=True)
        rows.append(row)
    lora = next((r["s_per_step"] for r in rows if r["algorithm"] == "lora"), None)
    print("\n| algorithm | s/step | × lora | adapter params | adapter + AdamW MiB |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['s_per_step'] / lora:.2f}" if lora else "—"
        print(
            f"| {r['algorithm']} | {r['s_per_step']:.4f} | {ratio} | {r['adapter_params']:,} | "
            f"{r['adapter_and_adam_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
