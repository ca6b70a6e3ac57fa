"""Training Options: memory, optimizer, schedule, accumulation, caption dropout, σ sampling, EMA, save dtype and
compile for the Train node's optional `options` input (the Train node stays simple without it)."""

from __future__ import annotations

import importlib.util

from comfy_api.latest import io

from ...trainer_core.training.options import MEMORY_CHOICES, TrainingOptions
from ...trainer_core.training.settings import (
    ALGORITHMS,
    COMPILE_BLOCKS,
    COMPUTE,
    LOKR_FACTOR_MAX,
    LR_SCHEDULES,
    SAVE_DTYPES,
    TIMESTEP_SAMPLING,
)
from ..comfy.training_options import TRAINING_OPTIONS


def _optimizers() -> list[str]:
    """adamw always; adamw8bit where bitsandbytes is installed (it stores the optimizer state in 8 bits)."""
    return ["adamw"] + (["adamw8bit"] if importlib.util.find_spec("bitsandbytes") is not None else [])


class KleinLabTrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabTrainingOptions",
            display_name="Klein Training Options",
            category="Klein LoRA Lab/train",
            description=(
                "Advanced choices for 'Klein Train LoRA' (connect to its options input): memory and speed, optimizer, "
                "learning-rate schedule, gradient accumulation, caption dropout, σ sampling, EMA, save dtype, "
                "compile, the adapter algorithm (LoRA, rsLoRA, LoKr, DoRA), preservation, compute precision. Every "
                "choice is stored with the run and kept on resume."
            ),
            inputs=[
                io.Combo.Input(
                    "memory",
                    options=list(MEMORY_CHOICES),
                    default="auto",
                    tooltip="auto: the fastest setting that fits this GPU's free memory (the choice and expected "
                    "peak show on the Train node; where nothing else fits, e.g. Klein 9B on a 10 GB card, part of the "
                    "base weights streams from host memory each step, slower); fastest: nothing recomputed (most "
                    "memory); least memory: every block recomputed (~40% slower); recompute share: the share below.",
                ),
                io.Float.Input(
                    "recompute_share",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="With memory 'recompute share': share of blocks recomputed in backward (0 = fastest, "
                    "1 = least memory).",
                ),
                io.Combo.Input(
                    "optimizer",
                    options=_optimizers(),
                    default="adamw",
                    tooltip="adamw (the default); adamw8bit keeps the optimizer state in 8 bits (needs bitsandbytes).",
                ),
                io.Combo.Input(
                    "lr_schedule",
                    options=list(LR_SCHEDULES),
                    default="constant",
                    tooltip="constant (the course's); cosine decays the learning rate to 0 by the last step.",
                ),
                io.Int.Input(
                    "warmup_steps",
                    default=0,
                    min=0,
                    max=10000,
                    tooltip="Steps over which the learning rate ramps up from 0 (at most the run's steps).",
                ),
                io.Int.Input(
                    "grad_accum",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Batches averaged per optimizer step: a larger effective batch without more memory.",
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Share of steps trained with the empty prompt (0-0.1): the LoRA also works without its "
                    "trigger.",
                ),
                io.Combo.Input(
                    "sigma_sampling",
                    options=list(TIMESTEP_SAMPLING),
                    default="uniform",
                    tooltip="How training picks noise levels: uniform over Klein's 50-step schedule (the default), "
                    "logit_normal (more mid noise), flux2_shift (musubi-tuner's convention).",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=0.0,
                    min=0.0,
                    max=0.9999,
                    step=0.0001,
                    round=0.0001,
                    tooltip="0 = off. e.g. 0.999: also save a smoothed LoRA (moving average of the weights) beside "
                    "each checkpoint, as step_N.ema in the loras list.",
                ),
                io.Combo.Input(
                    "save_dtype",
                    options=list(SAVE_DTYPES),
                    default="bf16",
                    tooltip="Precision of the saved LoRA files (bf16: half the size of fp32, no visible difference).",
                ),
                io.Combo.Input(
                    "compile",
                    options=list(COMPILE_BLOCKS),
                    default="auto",
                    tooltip="Compile the blocks for speed (auto = on NVIDIA GPUs). The first step pays a one-off "
                    "compile; off starts at once but runs slower.",
                ),
                io.Combo.Input(
                    "algorithm",
                    options=list(ALGORITHMS),
                    default="lora",
                    tooltip="What is trained. lora: the course's LoRA (fastest, the default). rslora: the same "
                    "LoRA scaled alpha/√rank, so a high rank keeps learning at the same learning rate. lokr: a "
                    "Kronecker-product adapter (LyCORIS LoKr, through PEFT). dora: LoRA plus a magnitude per "
                    "output (PEFT's DoRA), slower. Every type loads in the pack's loaders and core's Load LoRA.",
                ),
                io.Int.Input(
                    "lokr_factor",
                    default=-1,
                    min=-1,
                    max=LOKR_FACTOR_MAX,
                    tooltip="With algorithm lokr: how each weight side is split into factor × rest. -1 (the "
                    "default): the most balanced split; a larger factor gives a larger first matrix. 0 is not "
                    "allowed.",
                ),
                io.Float.Input(
                    "preservation",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="0 = off. Against 'the concept appears without the trigger': each caption without its "
                    "trigger (encoded by Klein Encode Dataset) is trained to keep the base model's own prediction, "
                    "with this weight (0.5-1). Costs a forward and a backward more on the steps it runs.",
                ),
                io.Float.Input(
                    "preservation_share",
                    default=1.0,
                    min=0.05,
                    max=1.0,
                    step=0.05,
                    tooltip="Share of steps that also run preservation (1 = every step, the strongest hold; 0.5 = "
                    "about every other step: cheaper, holds far less).",
                ),
                io.Combo.Input(
                    "compute",
                    options=list(COMPUTE),
                    default="bf16",
                    tooltip="fp8: the frozen model's matmuls run on fp8 tensor cores (RTX 40xx, H100 or newer), "
                    "faster steps at 1024² (more so with fp8 base weights from Load Diffusion Model); at 512² the "
                    "matmuls are too small to gain and bf16 is faster. The LoRA itself, norms and attention stay "
                    "bf16. Where the GPU has no fp8 tensor cores the run computes in bf16 and the Train node says why.",
                ),
            ],
            outputs=[TRAINING_OPTIONS.Output(display_name="options")],
        )

    @classmethod
    def execute(cls, sigma_sampling: str, **widgets) -> io.NodeOutput:
        return io.NodeOutput(TrainingOptions(timestep_sampling=sigma_sampling, **widgets))


NODES = [KleinLabTrainingOptions]
