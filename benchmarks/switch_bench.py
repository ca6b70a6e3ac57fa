"""Switching cost and sampling cost of forward-time LoRAs, next to core's merged LoraLoader, in one ComfyUI run.

"Switch" = the time from a new setting to "model ready": the node's work, `load_models_gpu`, and (ours) the
LoRA tensors placed on the device; CUDA is synchronised before the clock stops. Measured for
* a new scale of the same LoRA,
* a new checkpoint of the same run (different tensors; first view: file read from the page cache; revisit:
  our file cache hit; core reads the file every time, as its loader keeps only the last file),
* a new block vector (core emulated as Inspire-Pack's block-weight loader does it: the LoRA's patches added
  per block with per-key strengths, then re-patched on load).
"ours" = KleinLabLoraLoaderBlocks (forward-time), "core" = comfy.sd.load_lora_for_models (weights merged).
Sampling: seconds per sampler step with the LoRA merged (core) vs applied at forward time (ours), same seed.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/switch_bench.py                      # tiny Klein, CPU
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/switch_bench.py --device cuda --full-size   # Klein 4B

Full size: random bf16 Klein 4B (hidden 3072, 5 double + 20 single blocks, context 7680) made on the GPU and
handed to ComfyUI's own loader as a state dict (no file); rank-32 LoRAs over every block Linear (attention
qkv/proj, MLPs, linear1/linear2). Prints JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.pack import register_pack  # noqa: E402

FULL_4B = (3072, 5, 20, 7680)  # hidden, double, single, context
TEXT_TOKENS = 512


def import_comfy(device: str) -> None:
    """Import ComfyUI from $COMFYUI_PATH in this process, on the CPU or the GPU."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "comfy").is_dir():
        sys.exit("set COMFYUI_PATH=/path/to/ComfyUI (a ComfyUI 0.29+ checkout)")
    sys.path.insert(0, str(Path(root).resolve()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.disable_api_nodes = True


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_state_dict(full_size: bool, device: str) -> tuple[dict[str, torch.Tensor], object]:
    """Checkpoint-style state dict of a random Klein (full-size 4B in bf16 made on `device`, or the tiny one)."""
    from klein_lora_lab.trainer_core.model.tiny import (
        SPEC_4B_SHAPED,
        TinySpec,
        random_checkpoint,
        tiny_klein_state_dict,
    )

    if not full_size:
        return tiny_klein_state_dict(SPEC_4B_SHAPED), SPEC_4B_SHAPED
    hidden, double, single, ctx = FULL_4B
    spec = TinySpec(hidden=hidden, double_blocks=double, single_blocks=single, context_dim=ctx)
    return random_checkpoint(spec, device), spec


def random_lora(shape, rank: int, seed: int) -> dict:
    """A rank-`rank` LoRA over every block Linear (what a trained checkpoint of a run looks like)."""
    from klein_lora_lab.trainer_core.lora.adapters import LoraWeights
    from klein_lora_lab.trainer_core.lora.lora_formats import klein_linear_shapes
    from klein_lora_lab.trainer_core.model.block_weights import block_of

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fan_out, fan_in) in klein_linear_shapes(shape).items():
        if block_of(name) is None:
            continue
        down = (torch.randn(rank, fan_in, generator=gen) * fan_in**-0.5).bfloat16()
        out[name] = LoraWeights(down, (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16(), float(rank))
    return out


def timed(fn: Callable[[int], None], device: str, repeats: int) -> list[float]:
    """Milliseconds of fn(i) for i in 0..repeats (one untimed warm-up call with i = -1)."""
    fn(-1)
    sync(device)
    out = []
    for i in range(repeats):
        gc.collect()
        sync(device)
        t = time.perf_counter()
        fn(i)
        sync(device)
        out.append((time.perf_counter() - t) * 1000)
    return out


class Counter:
    """Counts ComfyUI weight patches: patch_weight_to_device calls for a key that carries a LoRA patch."""

    def __init__(self) -> None:
        import comfy.model_patcher

        self.n = 0
        self._cls = comfy.model_patcher.ModelPatcher
        self._orig = self._cls.patch_weight_to_device
        counter = self

        def counted(patcher, key, *a, **k):
            counter.n += key in patcher.patches  # a weight recomputed with a LoRA (not a plain move)
            return counter._orig(patcher, key, *a, **k)

        self._cls.patch_weight_to_device = counted

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--full-size", action="store_true", help="random Klein 4B instead of the tiny 4B-shaped one")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="sampler steps per sampling measurement")
    parser.add_argument("--res", type=int, default=0, help="image side in pixels (default: 1024 full, 256 tiny)")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch (CPU runs; steadier timings)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    import_comfy(args.device)
    register_pack()

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    from klein_lora_lab.nodes.comfy import forward_loras as comfy_adapters
    from klein_lora_lab.nodes.comfy.forward_loras import forward_loras_of
    from klein_lora_lab.nodes.comfy.lora_cache import LORA_FILES
    from klein_lora_lab.nodes.loras.lora_loader_blocks import KleinLabLoraLoaderBlocks
    from klein_lora_lab.trainer_core.lora.lora_formats import write_peft
    from klein_lora_lab.trainer_core.model.klein import read_shape
    from safetensors.torch import save_file

    import nodes

    sd, spec = model_state_dict(args.full_size, args.device)
    options = {"dtype": torch.bfloat16} if args.full_size else {}
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    del sd
    mm.load_models_gpu([model], force_full_load=True)
    shape = read_shape(model.model.diffusion_model)
    device = mm.get_torch_device()
    dtype = model.model.get_dtype_inference()
    label = f"{'Klein 4B (random)' if args.full_size else 'tiny 4B-shaped'} on {args.device}"
    if args.device == "cuda":
        label += f" ({torch.cuda.get_device_name()})"
    label += f", rank {args.rank}, {dtype}".replace("torch.", "")

    tmp = Path(tempfile.mkdtemp(prefix="klein_switch_"))
    folder_paths.add_model_folder_path("loras", str(tmp))
    names = []
    for k in range(args.repeats + 1):  # checkpoints of one run: same targets and rank, different tensors
        name = f"run_step_{k:04d}.safetensors"
        save_file(write_peft(random_lora(shape, args.rank, seed=k)), str(tmp / name))
        names.append(name)
    core_sd = [comfy.utils.load_torch_file(str(tmp / n), safe_load=True) for n in names[:2]]
    groups = {f"{g}_strength": 1.0 for g in ("binding", "texture", "identity", "composition")}
    n_blocks = shape.double_blocks + shape.single_blocks
    patches = Counter()

    def ours(name: str, strength: float, preset: str = "all", vector: str = "") -> object:
        (clone,) = KleinLabLoraLoaderBlocks.execute(model, name, strength, preset, 1.0, vector, **groups).result
        mm.load_models_gpu([clone])
        forward_loras_of(clone).stack(device, dtype)  # tensors on the device: ready to sample
        return clone

    def core(lora_sd: dict, strength: float) -> object:
        clone, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0.0)
        mm.load_models_gpu([clone])
        return clone

    def core_blocks(lora_sd: dict, vector: list[float]) -> object:
        """Inspire-Pack style: the LoRA's patches added per block with that block's strength, then loaded."""
        import comfy.lora

        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
        clone = model.clone()
        for i, value in enumerate(vector):
            block = f"double_blocks.{i}." if i < shape.double_blocks else f"single_blocks.{i - shape.double_blocks}."
            part = {k: v for k, v in loaded.items() if k.startswith(f"diffusion_model.{block}")}
            clone.add_patches(part, value)
        mm.load_models_gpu([clone])
        return clone

    def vector(i: int) -> list[float]:
        return [((i + j) % 3) / 2 for j in range(n_blocks)]

    results = []

    def record(what: str, method: str, times: list[float], patched: int) -> None:
        row = {
            "bench": "switch",
            "model": label,
            "what": what,
            "method": method,
            "ms_median": round(statistics.median(times), 3),
            "ms_min": round(min(times), 3),
            "ms_max": round(max(times), 3),
            "repeats": len(times),
            "weight_patches_per_switch": patched / (len(times) + 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    scales = lambda i: 0.5 + 0.05 * (i % 7)  # noqa: E731  (a different scale every switch)
    patches.take()
    record("new scale", "ours", timed(lambda i: ours(names[0], scales(i)), args.device, args.repeats), patches.take())
    record("new scale", "core", timed(lambda i: core(core_sd[0], scales(i)), args.device, args.repeats), patches.take())

    def ours_new_checkpoint(i: int) -> None:
        LORA_FILES.clear()  # first view of this checkpoint: read from disk (page cache) and placed on the device
        ours(names[i + 1], 1.0)

    record("new checkpoint (first view)", "ours", timed(ours_new_checkpoint, args.device, args.repeats), patches.take())
    record(
        "new checkpoint (revisit)",
        "ours",
        timed(lambda i: ours(names[(i + 1) % 2], 1.0), args.device, args.repeats),
        patches.take(),
    )

    def core_new_checkpoint(i: int) -> None:
        core(comfy.utils.load_torch_file(str(tmp / names[(i + 1) % 2]), safe_load=True), 1.0)

    record("new checkpoint", "core", timed(core_new_checkpoint, args.device, args.repeats), patches.take())

    def ours_vector(i: int) -> None:
        ours(names[0], 1.0, "custom", ",".join(f"{v:g}" for v in vector(i)))

    record("new block vector", "ours", timed(ours_vector, args.device, args.repeats), patches.take())
    record(
        "new block vector",
        "core",
        timed(lambda i: core_blocks(core_sd[0], vector(i)), args.device, args.repeats),
        patches.take(),
    )

    # Sampling: same seed and settings; core's LoRA merged into the weights vs ours at forward time.
    res = args.res or (1024 if args.full_size else 256)
    gen = torch.Generator().manual_seed(0)
    ctx_len = TEXT_TOKENS if args.full_size else 16
    pos = [[torch.randn(1, ctx_len, shape.context_dim, generator=gen).to(dtype), {}]]
    neg = [[torch.zeros(1, ctx_len, shape.context_dim).to(dtype), {}]]
    latent = {"samples": torch.zeros(1, 128, res // 16, res // 16)}

    def sample(patcher) -> Callable[[int], None]:
        return lambda i: nodes.common_ksampler(patcher, 0, args.steps, args.cfg, "euler", "simple", pos, neg, latent)

    merged = comfy.sd.load_lora_for_models(model, None, core_sd[0], 1.0, 0.0)[0]
    (forward,) = KleinLabLoraLoaderBlocks.execute(model, names[0], 1.0, "all", 1.0, "", **groups).result
    reps = max(3, args.repeats // 3)
    budget = comfy_adapters.merge_budget

    def per_call(patcher) -> Callable[[int], None]:
        """Ours without the per-run merge cache (the path taken when the device has no memory to spare)."""

        def run(i: int) -> None:
            comfy_adapters.merge_budget = lambda device: 0
            try:
                sample(patcher)(i)
            finally:
                comfy_adapters.merge_budget = budget

        return run

    t_merged, t_ours, t_call = [], [], []
    for _ in range(2):  # interleaved, so drift hits all three
        t_merged += timed(sample(merged), args.device, reps)
        t_ours += timed(sample(forward), args.device, reps)
        t_call += timed(per_call(forward), args.device, reps)
    peak = {}
    if args.device == "cuda":
        for method, fn in (("core merged", sample(merged)), ("ours forward-time", sample(forward))):
            torch.cuda.reset_peak_memory_stats()
            fn(0)
            peak[method] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    methods = (("core merged", t_merged), ("ours forward-time", t_ours), ("ours per-call (no merge cache)", t_call))
    for method, times in methods:
        row = {
            "bench": "sampling",
            "model": label,
            "method": method,
            "res": res,
            "cfg": args.cfg,
            "steps": args.steps,
            "ms_per_step_median": round(statistics.median(times) / args.steps, 3),
            "peak_gib": peak.get(method),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    slowdown = statistics.median(t_ours) / statistics.median(t_merged) - 1
    slowdown_call = statistics.median(t_call) / statistics.median(t_merged) - 1
    print(
        json.dumps(
            {
                "bench": "sampling_slowdown",
                "model": label,
                "ours_vs_merged_pct": round(100 * slowdown, 2),
                "per_call_vs_merged_pct": round(100 * slowdown_call, 2),
            }
        )
    )

    print(f"\n### Switching: {label}\n")
    print("| change | method | median ms | min ms | max ms | weight patches per switch |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        if r["bench"] == "switch":
            print(
                f"| {r['what']} | {r['method']} | {r['ms_median']:.2f} | {r['ms_min']:.2f} | {r['ms_max']:.2f} "
                f"| {r['weight_patches_per_switch']:.0f} |"
            )
    print(f"\n### Sampling ({res}², cfg {args.cfg:g}, {args.steps} euler steps): {label}\n")
    print("| method | ms per step (median) |")
    print("|---|---:|")
    for r in results:
        if r["bench"] == "sampling":
            print(f"| {r['method']} | {r['ms_per_step_median']:.2f} |")
    print(f"\nforward-time vs merged: {100 * slowdown:+.1f}% per sampling step")


if __name__ == "__main__":
    main()
