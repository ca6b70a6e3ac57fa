"""A sweep's overhead over its runs trained one by one, on the tiny Klein (CPU), through ComfyUI in-process.

Both sides train the same runs on the same UNETLoader-loaded tiny model, with the same album (a generated latent
album: there is no tiny VAE) and settings built by the same function:
  alone: for each value, new_or_resumed_run + train_in_comfy (the Train node's path);
  sweep: train_sweep over the same values (the Sweep node's path: plan, existing-run check, manifest writes,
         status checks, progress text, then the same train_in_comfy per run).
Repeats alternate alone / sweep so drift of a shared machine hits both. Prints one JSON line per repeat and the
medians of wall time and of process CPU time (CPU time is what a busy shared machine inflates least), then the
sweep's own bookkeeping timed alone (plan, run checks, manifest writes): on a shared machine the difference
between the two totals is mostly noise, the bookkeeping time is the overhead itself.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sweep_overhead.py --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.comfy_env import comfy_path, import_comfy_inprocess  # noqa: E402
from harness.pack import register_pack  # noqa: E402

VALUES = "1e-3, 2e-3, 5e-3"


def album(count: int = 4):
    from klein_lora_lab.trainer_core.album.latent_cache import EncodedDataset
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning
    from klein_lora_lab.trainer_core.training.data import TrainItem, train_items_hash

    gen = torch.Generator().manual_seed(0)
    context = tiny_conditioning(TinySpec(), tokens=8, seed=1)[0]
    items = tuple(TrainItem(torch.randn(128, 2, 2, generator=gen), context, name=f"x{i}") for i in range(count))
    return EncodedDataset(
        items, ("TOK",) * count, None, (), (), train_items_hash(items), "TOK", "images", count, 0, 0.0
    )


def widgets(steps: int) -> dict:
    return dict(
        rank=4,
        alpha=4.0,
        learning_rate=1e-3,
        steps=steps,
        batch_size=1,
        checkpoint_every=max(1, steps // 4),
        sample_every=0,
        seed=0,
        targets="attention",
        validation_every=0,
        validation_holdout=0.0,
        mixed_precision="fp32",
    )


def timed(fn, tag: str) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(tag)
    return time.perf_counter() - wall, time.process_time() - cpu


def bookkeeping_seconds(name: str, widgets_: dict, times: int = 20) -> list[float]:
    """What train_sweep does besides training, timed alone on a finished sweep's folders: the plan, the check of
    the runs on disk, and the status check + manifest write before and after every run."""
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.nodes.comfy.sweeps import sweep_plan
    from klein_lora_lab.trainer_core.runs.sweep import check_existing, statuses, write_manifest
    from klein_lora_lab.trainer_core.training.trainer import RESUMABLE_CHANGES

    root = register_runs_folder()
    out = []
    for _ in range(times):
        start = time.perf_counter()
        plan = sweep_plan(name, "learning_rate", VALUES, "style", widgets_)
        check_existing(root, plan, RESUMABLE_CHANGES)
        for _step in range(len(plan.runs) + 1):
            write_manifest(root, plan, statuses(root, plan))
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = comfy_path()
    if root is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    import_comfy_inprocess(root)
    register_pack()
    import folder_paths
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.nodes.comfy.sweeps import sweep_plan, train_sweep
    from klein_lora_lab.nodes.comfy.train_setup import new_or_resumed_run, settings_from_widgets
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein_state_dict
    from klein_lora_lab.trainer_core.runs.sweep import parse_values
    from safetensors.torch import save_file

    import nodes

    tmp = Path(tempfile.mkdtemp(prefix="klein-sweep-bench-"))
    save_file(tiny_klein_state_dict(TinySpec(), 0), str(tmp / "tiny.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(tmp))
    (model,) = nodes.UNETLoader().load_unet("tiny.safetensors", "default")
    encoded = album()
    w = widgets(args.steps)

    def alone(tag: str) -> None:
        for value in parse_values("learning_rate", VALUES):
            settings = settings_from_widgets("style", **{**w, "learning_rate": value})
            run = new_or_resumed_run(f"alone-{tag}-{value:g}", settings, encoded, resume=False)
            train_in_comfy(model, encoded.items, settings, run, False, None, None, None)

    def sweep(tag: str) -> None:
        train_sweep(model, encoded, sweep_plan(f"sweep-{tag}", "learning_rate", VALUES, "style", w), 0, 1.0, None)

    rows = []
    with torch.inference_mode():
        for i in range(args.repeats):
            folder_paths.set_output_directory(str(tmp / f"out{i}"))
            register_runs_folder()
            a = timed(alone, str(i))
            s = timed(sweep, str(i))
            row = {"repeat": i, "alone_s": a[0], "sweep_s": s[0], "alone_cpu_s": a[1], "sweep_cpu_s": s[1]}
            rows.append(row)
            print(json.dumps(row))
    book = bookkeeping_seconds(f"sweep-{args.repeats - 1}", w)
    med = {k: statistics.median(r[k] for r in rows) for k in ("alone_s", "sweep_s", "alone_cpu_s", "sweep_cpu_s")}
    summary = {
        "runs": 3,
        "steps_per_run": args.steps,
        **{k: round(v, 3) for k, v in med.items()},
        "overhead_wall_pct": round(100 * (med["sweep_s"] / med["alone_s"] - 1), 2),
        "overhead_cpu_pct": round(100 * (med["sweep_cpu_s"] / med["alone_cpu_s"] - 1), 2),
        "bookkeeping_ms_median": round(1000 * statistics.median(book), 1),
        "bookkeeping_pct_of_sweep": round(100 * statistics.median(book) / med["sweep_s"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
