"""Real training runs on the tiny Klein for tests: `make_tiny_run(runs_dir, name, steps=(1, 2, 3))`.

The run is trained through `trainer_core.train` on the tiny Klein the test server loads (`TinySpec()`, seed 0,
the weights of `tiny_klein_path()`), on one constructed latent captioned with FakeClip's conditioning of
`caption`, with a learning rate high enough that every checkpoint is a visibly different LoRA. Checkpoints are
written every gcd(steps) steps and the ones not asked for are removed (LoRA file and resume state together),
so the folder holds exactly one checkpoint per requested step, as a run stopped at those steps would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from pathlib import Path

import torch

from .comfy_test_nodes import FakeClip

DEFAULT_CAPTION = "a TOK cat"


def tiny_run_latent(height: int = 4, width: int = 4, seed: int = 7) -> torch.Tensor:
    """The training target: a smooth latent [128, height, width] (a gradient plus seeded per-channel offsets)."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1.0, 1.0, height)[:, None] + torch.linspace(-1.0, 1.0, width)[None, :]  # [h, w]
    return torch.randn(128, 1, 1, generator=gen) + ramp[None]


def make_tiny_run(
    runs_dir: Path,
    name: str,
    steps: Sequence[int] = (1, 2, 3),
    *,
    caption: str = DEFAULT_CAPTION,
    rank: int = 4,
    learning_rate: float = 2e-2,
    latent_hw: tuple[int, int] = (4, 4),
    seed: int = 0,
):
    """Train the tiny Klein into `runs_dir/name` and keep checkpoints exactly at `steps`; returns the RunFolder.

    Each checkpoint is `runs_dir/name/checkpoints/step_000001.safetensors` etc. (our LoRA format, fp32), with its
    resume state. `runs_dir` is usually `<ComfyUI output>/klein_lora_lab/runs` so the scrub node lists the run.
    """
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.settings import TrainSettings
    from klein_lora_lab.trainer_core.training.trainer import train

    wanted = sorted(set(int(s) for s in steps))
    if not wanted or wanted[0] < 1:
        raise ValueError(f"steps={tuple(steps)}: give at least one checkpoint step, each >= 1.")
    settings = TrainSettings(
        rank=rank,
        alpha=float(rank),
        learning_rate=learning_rate,
        steps=wanted[-1],
        checkpoint_every=reduce(math.gcd, wanted),
        save_dtype="fp32",
        mixed_precision="fp32",
        gradient_checkpointing=False,
        compile_blocks="off",
        seed=seed,
    )
    spec = TinySpec()
    context = FakeClip(spec.context_dim).encode_from_tokens_scheduled(FakeClip().tokenize(caption))[0][0][0]
    item = TrainItem(tiny_run_latent(*latent_hw), context, name="tiny")
    run = RunFolder.create(Path(runs_dir) / name, settings, {"trigger": "TOK", "caption": caption})
    train(tiny_klein(spec, seed=0), [item], settings, run)
    for path in run.checkpoints():
        step = checkpoint_step(path)
        if step not in wanted:
            path.unlink()
            run.state_path(step).unlink(missing_ok=True)
    return run
