"""Klein 9B under a 10 GiB cap: full-size random Klein 9B loaded by ComfyUI with fp8 weights (~8.4 GiB), trained
through the Train node's path (`train_in_comfy`) with memory auto and fp8 compute at 1024².

Locks in what the CPU tests check with a simulated budget and the tiny model: where even every block recomputed
with its inputs in host memory does not fit, auto streams part of the base weights from host memory through
ComfyUI's partial loading, the run trains without going over the cap, and afterwards the MODEL is fully loaded
again. Prints s/step, the peak and the streamed bytes (the same figures as
`benchmarks/train_bench.py --variants 9b --res 1024 --which ours-auto --weight-dtype fp8 --compute fp8 --cap-gib 10`).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest
import torch

GIB = 2**30
CAP_GIB = 10.0
RES = 1024
KLEIN_9B = (4096, 8, 24, 12288)  # hidden, double blocks, single blocks, context dim


@pytest.fixture(scope="module")
def comfy_on_cuda():
    """ComfyUI imported in this process for the GPU (its model management reads the device when imported)."""
    from harness.comfy_env import import_comfy_for_cuda

    why_not = import_comfy_for_cuda()
    if why_not is not None:
        pytest.skip(why_not)
    import comfy.model_management as mm

    return mm


def _random_klein_9b_fp8():
    """Klein 9B through ComfyUI's loader with fp8 (e4m3fn) weights, as UNETLoader's weight_dtype option does."""
    import comfy.model_management as mm
    import comfy.sd
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, random_checkpoint

    hidden, double, single, ctx = KLEIN_9B
    spec = TinySpec(hidden=hidden, double_blocks=double, single_blocks=single, context_dim=ctx)
    sd = {k: v.cpu() for k, v in random_checkpoint(spec, "cuda").items()}
    torch.cuda.empty_cache()
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float8_e4m3fn})
    del sd
    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def test_klein_9b_fp8_trains_under_10_gib_by_streaming_weights(comfy_on_cuda, tmp_path: Path) -> None:
    """3 steps at 1024² under a 10 GiB cap: the plan streams part of the base weights (and says how much), no
    step runs out of memory, the peak stays under the cap, and the MODEL is fully loaded again afterwards."""
    import folder_paths
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder, runs_dir
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    mm = comfy_on_cuda
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 24 * GIB:
        pytest.skip("needs a GPU with 24 GiB or more (the cap is 10 GiB of it; building the model needs more)")
    folder_paths.set_output_directory(str(tmp_path / "output"))
    register_runs_folder()
    patcher = _random_klein_9b_fp8()
    gen = torch.Generator().manual_seed(0)
    items = [
        TrainItem(
            torch.randn(128, RES // 16, RES // 16, generator=gen).cuda(),
            torch.randn(512, KLEIN_9B[3], generator=gen).cuda(),
            name="item0",
        )
    ]
    settings = TrainSettings(
        rank=32, alpha=32.0, steps=3, checkpoint_every=0, sample_every=0, memory_mode="auto", compute="fp8"
    )
    run = RunFolder.create(runs_dir() / f"stream-9b-{tmp_path.name}", settings, {})
    torch.cuda.set_per_process_memory_fraction(CAP_GIB * GIB / total)
    try:
        mm.unload_all_models()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        outcome = train_in_comfy(patcher, items, settings, run, False, None, None, None)
        peak = torch.cuda.max_memory_allocated()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    seconds = [r["seconds"] for r in run.read_metrics() if "seconds" in r]
    plans = [n for n in outcome.notices if n.startswith("memory")]
    streamed = [float(m.group(1)) for m in (re.search(r"streaming ([\d.]+) GiB", p) for p in plans) if m]
    print(
        f"\n[9B fp8 under {CAP_GIB:g} GiB] s/step {statistics.median(seconds[1:] or seconds):.3f} "
        f"(first {seconds[0]:.1f} s), peak {peak / GIB:.2f} GiB, streamed {streamed[-1] if streamed else 0:.1f} GiB"
    )
    print("\n".join(f"  {line}" for line in outcome.notices))
    assert outcome.result is not None and outcome.result.steps_done == 3
    assert streamed and streamed[-1] > 0, plans
    assert peak < CAP_GIB * GIB
    assert not patcher.model.model_lowvram and patcher.loaded_size() == patcher.model_size()
