"""Several devices on the CPU, tiny Klein: what the worker processes and the data-parallel ranks cost and save.

Prints one JSON line per case (wall seconds, measured, never asserted):
  sweep_alone    the runs of a sweep trained one after another in this process
  sweep_workers  the same runs on `--workers` CPU worker processes (spawn, model built in each, same train())
  dp_alone       one run with batch B in this process
  dp_ranks       the same run over 2 gloo processes with batch B/2 each (losses compared: max relative gap)
On a machine with fewer free cores than processes the workers only add start-up time; the figures show that
start-up (spawn + imports + model) and the per-step cost of the gradient all-reduce. GPU figures need GPUs.

    OMP_NUM_THREADS=1 python benchmarks/devices_bench.py --steps 20 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.pack import register_pack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    register_pack()
    from klein_lora_lab.trainer_core.model.tiny import TinySource, TinySpec, tiny_klein
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.distributed import train_data_parallel
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import train
    from klein_lora_lab.trainer_core.training.workers import RunJob, train_runs_on_devices

    spec = TinySpec(hidden=128, double_blocks=2, single_blocks=2, context_dim=16)
    g = torch.Generator().manual_seed(0)
    items = [TrainItem(torch.randn(128, 4, 4, generator=g), torch.randn(6, 16, generator=g)) for _ in range(8)]
    base = dict(rank=8, alpha=8, steps=args.steps, checkpoint_every=0, save_dtype="fp32", batch_size=4)
    settings = [TrainSettings(**base, learning_rate=1e-3 * (i + 1)) for i in range(args.runs)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for i, s in enumerate(settings):
            train(tiny_klein(spec), items, s, RunFolder.create(root / f"a{i}", s, {}))
        report("sweep_alone", time.perf_counter() - start, runs=args.runs, steps=args.steps)
        jobs = [RunJob(i, RunFolder.create(root / f"w{i}", s, {}).path, s, False) for i, s in enumerate(settings)]
        start = time.perf_counter()
        train_runs_on_devices(jobs, ["cpu"] * args.workers, TinySource(spec), items)
        report("sweep_workers", time.perf_counter() - start, runs=args.runs, workers=args.workers, steps=args.steps)
        s = settings[0]
        start = time.perf_counter()
        train(tiny_klein(spec), items, s, RunFolder.create(root / "dpa", s, {}))
        report("dp_alone", time.perf_counter() - start, batch=s.batch_size, steps=args.steps)
        RunFolder.create(root / "dpr", s, {})
        start = time.perf_counter()
        train_data_parallel(TinySource(spec), items, s, root / "dpr", ["cpu", "cpu"])
        seconds = time.perf_counter() - start
        alone = [r["loss"] for r in RunFolder.open(root / "dpa").read_metrics()]
        ranks = [r["loss"] for r in RunFolder.open(root / "dpr").read_metrics()]
        gap = max(abs(a - b) / abs(a) for a, b in zip(alone, ranks, strict=True))
        report("dp_ranks", seconds, batch=s.batch_size, ranks=2, steps=args.steps, max_rel_loss_gap=gap)


def report(case: str, seconds: float, **extra) -> None:
    print(json.dumps({"case": case, "seconds": round(seconds, 2), **extra}), flush=True)


if __name__ == "__main__":
    main()
