"""How much of the blocks to recompute in backward: the memory plan of a training run.

Activation checkpointing trades speed for memory one block at a time: a recomputed block keeps only its inputs
and runs its forward a second time in backward. `auto` estimates, from the model's shapes and the album's
largest bucket, how many bytes one block's activations take and keeps as many blocks un-recomputed as fit the
memory the device has for this process (free memory, capped by a per-process memory fraction), minus a safety
margin. The estimate is checked against the first step's measured peak and the plan corrected; if a step still
runs out of memory, the run falls back to recomputing every block (least memory) and says so. Where even least
memory does not fit (Klein 9B under 10 GiB), the recomputed blocks' inputs also move to host memory during the
step (`offload`: pinned memory, copied back for backward), and a run out of memory at least memory falls back
to that. Where even that does not fit (Klein 9B with fp8 weights under 10 GiB: the weights alone take ~8.4 GiB),
auto also leaves the fewest bytes of base weights that make it fit in host memory (`stream_bytes`): ComfyUI's
partial loading keeps those modules' weights on the host and casts each one to the device when it is called, so
every step copies them over again (slower). Every block is recomputed then, so only the block being recomputed
holds its copies in backward, and the blocks run uncompiled (ComfyUI's per-call casting runs outside compiled
graphs). This module only decides the bytes; the caller that loaded the model streams them (`WeightStreamer`).

Estimate (bf16 activations, per block, per image of `tokens` = text + image (+ reference) tokens):
    saved activations   ≈ ACTIVATION_WIDTHS · tokens · hidden · 2 bytes   (measured: 16.3 on 4B, 16.4 on 9B,
                          compiled blocks, H200, docs/gpu-performance.md; eager blocks keep more)
    a recomputed block  ≈ 1 · tokens · hidden · 2 bytes                   (its input)
    backward working set ≈ one block's activations again (the block being recomputed) + gradients
    streamed weights     ≈ the largest block's weights as bf16 copies (saved for its input gradients while it is
                          recomputed) + the largest Linear's weight as an fp32 copy (ComfyUI casts a weight to its
                          input's dtype, fp32 under autocast after a norm; freed after the call)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from ..model.klein import KleinShape
from .settings import TrainSettings

GIB = 2**30
# Saved activations of one block in hidden-wide bf16 tensors per token (see the module doc), with a little
# headroom over the measured 16.4 (compiled); eager blocks keep the unfused element-wise intermediates too.
ACTIVATION_WIDTHS = {True: 17.5, False: 24.0}
INPUT_WIDTHS = 1.0  # a recomputed block keeps its input stream(s): tokens · hidden
WORK_BLOCKS = 1.25  # backward working set, in blocks' activations
LORA_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments
MARGIN_SHARE = 0.08  # safety margin: the allocator's fragmentation, cuBLAS/attention workspaces
MARGIN_MIN = GIB // 2


@dataclass(frozen=True)
class MemoryBudget:
    """What the process holds now and the most it may hold (bytes)."""

    in_use: int
    limit: int


class MemoryProbe(Protocol):
    """Reads the device's memory: the budget before training, and the peak of a step."""

    def budget(self) -> MemoryBudget: ...

    def reset_peak(self) -> None: ...

    def peak(self) -> int: ...


class CudaProbe:
    """The CUDA device's memory as PyTorch's allocator sees it, including a per-process memory fraction."""

    def __init__(self, device: torch.device) -> None:
        # The per-process fraction is read per device index; "cuda" alone means the current device.
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def budget(self) -> MemoryBudget:
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        cached = torch.cuda.memory_reserved(self.device) - allocated  # reusable without asking the driver
        limit = allocated + cached + free
        fraction = torch.cuda.get_per_process_memory_fraction(self.device)
        return MemoryBudget(in_use=allocated, limit=min(limit, int(total * fraction)))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class WeightStreamer(Protocol):
    """Keeps part of the loaded base weights in host memory, each module's weight cast to the device per call
    (ComfyUI's partial loading: nodes/comfy/model_env.py). trainer_core only says how many bytes."""

    def streamable(self) -> int:
        """Bytes of base weights on the device that could be left in host memory."""
        ...

    def stream(self, nbytes: int) -> int:
        """Leave at least `nbytes` of base weights in host memory in all (whole modules, so a little more may
        go); returns the bytes left there now. Never brings streamed weights back."""
        ...


def default_probe(device: torch.device) -> MemoryProbe | None:
    """CUDA devices are probed; elsewhere no limit is known (auto then recomputes nothing)."""
    return CudaProbe(device) if device.type == "cuda" else None


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of one block's saved activations, of a recomputed block's input, and of backward's working set."""

    per_block: int
    per_input: int
    work: int


def estimate_activations(
    shape: KleinShape, tokens: int, batch: int, compiled: bool, cast_weights: int = 0
) -> ActivationEstimate:
    """The activation bytes of one block at `tokens` tokens per image and `batch` images (see the module doc).
    cast_weights: bytes of a block's weights cast to bf16 per call (fp8 weights), which backward keeps for
    every block that is not recomputed."""
    width = batch * tokens * shape.hidden * 2  # one hidden-wide bf16 tensor: [b, tokens, hidden]
    per_block = int(ACTIVATION_WIDTHS[compiled] * width) + cast_weights
    return ActivationEstimate(per_block, int(INPUT_WIDTHS * width), int(WORK_BLOCKS * per_block))


@dataclass(frozen=True)
class MemoryPlan:
    """The share of blocks recomputed in backward and why; expected_peak/limit are None where nothing is known."""

    mode: str
    share: float
    blocks: int
    reason: str
    expected_peak: int | None = None
    limit: int | None = None
    fixed: int = 0  # bytes that do not depend on the share: base in use, LoRA state, working set
    estimate: ActivationEstimate | None = None
    fell_back: bool = False
    offload: bool = False  # the recomputed blocks' inputs wait in host memory (klein_forward offload_inputs)
    compiled: bool = False  # the blocks run compiled under this plan (never while weights stream)
    eager: ActivationEstimate | None = None  # the estimate of uncompiled blocks, when `estimate` is a compiled one
    stream_bytes: int = 0  # bytes of base weights left in host memory, cast to the device per call
    streamable: int = 0  # bytes of base weights on the device that could be left in host memory
    stream_work: int = 0  # what streaming adds to the working set (see the module doc)

    def peak_at(self, share: float, offload: bool | None = None, stream: int | None = None) -> int:
        """Expected peak bytes with `share` of the blocks recomputed (their inputs on the host with `offload`)
        and `stream` bytes of base weights in host memory (defaults: this plan's)."""
        if self.estimate is None:
            raise ValueError("this plan has no activation estimate")
        recomputed = round(share * self.blocks)
        kept = self.blocks - recomputed
        per_input = 0 if (self.offload if offload is None else offload) else self.estimate.per_input
        streamed = self.stream_bytes if stream is None else stream
        streaming = streamed - self.stream_work if streamed > 0 else 0
        return self.fixed + recomputed * per_input + kept * self.estimate.per_block - streaming

    def uncompiled(self) -> MemoryPlan:
        """This plan with the blocks run eagerly: their larger activation estimate in `fixed` and `estimate`."""
        if not self.compiled or self.eager is None or self.estimate is None:
            return replace(self, compiled=False)
        fixed = self.fixed - self.estimate.work + self.eager.work
        return replace(self, compiled=False, estimate=self.eager, eager=None, fixed=fixed)

    def describe(self) -> str:
        """One line for the node: the choice, the expected peak and the reason."""
        recomputed = round(self.share * self.blocks)
        what = (
            "nothing recomputed"
            if recomputed == 0
            else "every block recomputed"
            if recomputed == self.blocks
            else f"{recomputed} of {self.blocks} blocks recomputed"
        ) + (", their inputs in host memory" if self.offload else "")
        if self.stream_bytes:
            what += f", streaming {self.stream_bytes / GIB:.1f} GiB of the base weights from host memory each step"
            what += " (slower)"
        peak = f", expected peak {self.expected_peak / GIB:.1f} GiB" if self.expected_peak else ""
        limit = f" of {self.limit / GIB:.1f} GiB" if self.limit else ""
        return f"memory {self.mode.replace('_', ' ')}: {what}{peak}{limit}. {self.reason}"


def cast_weight_bytes(blocks: list[torch.nn.Module]) -> int:
    """Mean bytes per block of the weights stored in fewer than 2 bytes (fp8), as bf16 copies."""
    if not blocks:
        return 0
    total = sum(p.numel() * 2 for b in blocks for p in b.parameters() if p.element_size() < 2)
    return total // len(blocks)


def stream_work_bytes(blocks: list[torch.nn.Module]) -> int:
    """What streamed weights add to the working set (module doc): the largest block's weights as bf16 copies and
    the largest Linear's weight as an fp32 copy."""
    if not blocks:
        return 0
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    linear = max((m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)), default=0)
    return 2 * block + 4 * linear


def margin(limit: int) -> int:
    return max(MARGIN_MIN, int(MARGIN_SHARE * limit))


def _fixed_share(settings: TrainSettings) -> tuple[float, str]:
    if settings.memory_mode == "fastest":
        return 0.0, "chosen: fastest"
    if settings.memory_mode == "least_memory":
        return 1.0, "chosen: least memory"
    share = settings.checkpoint_share if settings.gradient_checkpointing else 0.0
    return share, f"chosen: recompute share {share:g}"


def plan_memory(
    settings: TrainSettings,
    shape: KleinShape,
    tokens: int,
    compiled: bool,
    lora_params: int,
    probe: MemoryProbe | None,
    cast_weights: int = 0,
    streamable: int = 0,
    stream_work: int = 0,
) -> MemoryPlan:
    """The plan for a run whose largest bucket has `tokens` tokens per image (text + image + references);
    cast_weights as in estimate_activations; streamable: bytes of base weights the caller can leave in host memory
    (0: none, the caller streams nothing), stream_work: stream_work_bytes of the blocks."""
    blocks = shape.double_blocks + shape.single_blocks
    estimate = estimate_activations(shape, tokens, settings.batch_size, compiled, cast_weights)
    eager = estimate_activations(shape, tokens, settings.batch_size, False, cast_weights) if compiled else None
    budget = probe.budget() if probe is not None else None
    fixed = 0 if budget is None else budget.in_use + lora_params * LORA_BYTES_PER_PARAM + estimate.work
    base = MemoryPlan(
        settings.memory_mode,
        0.0,
        blocks,
        "",
        limit=None if budget is None else budget.limit,
        fixed=fixed,
        estimate=estimate,
        compiled=compiled,
        eager=eager,
        streamable=max(0, streamable),
        stream_work=stream_work,
    )
    if settings.memory_mode != "auto":
        share, reason = _fixed_share(settings)
        return replace(base, share=share, reason=reason, expected_peak=base.peak_at(share) if budget else None)
    if budget is None:
        return replace(base, reason="No device memory limit is known here: nothing is recomputed.")
    return _choose(base, "")


STREAM_REASON = (
    "Even least memory with the blocks' inputs in host memory does not fit: part of the base weights stays in host "
    "memory and is copied to the device as each block runs (slower steps; blocks uncompiled while weights stream)."
)


def _choose(plan: MemoryPlan, note: str) -> MemoryPlan:
    """The smallest recompute share whose expected peak fits the limit minus the margin; where every block
    recomputed with its inputs in host memory does not fit, the fewest bytes of streamed base weights that do."""
    assert plan.limit is not None and plan.estimate is not None
    room = plan.limit - margin(plan.limit)
    saved_per_kept = plan.estimate.per_block - plan.estimate.per_input
    all_recomputed = plan.peak_at(1.0, offload=False, stream=0)
    if plan.stream_bytes > 0 or all_recomputed > room:
        offloaded = replace(plan, share=1.0, offload=True)
        if plan.stream_bytes == 0 and offloaded.peak_at(1.0) <= room:
            reason = "Least memory does not fit: the blocks' inputs wait in host memory (slower steps)."
            return replace(offloaded, expected_peak=offloaded.peak_at(1.0), reason=(note + " " + reason).strip())
        streamed = _streamed(offloaded, room)
        if streamed is not None:
            return replace(streamed, reason=(note + " " + STREAM_REASON).strip())
        reason = "Even least memory with the blocks' inputs in host memory may not fit"
        if plan.streamable > 0:
            offloaded = _streaming(offloaded, plan.streamable)
            reason += ", not even with every base weight streamed from host memory"
        reason += ": lower the resolution or batch, or load fp8 weights."
        return replace(offloaded, expected_peak=offloaded.peak_at(1.0), reason=(note + " " + reason).strip())
    kept = min(plan.blocks, math.floor((room - all_recomputed) / max(1, saved_per_kept)))
    share = (plan.blocks - kept) / plan.blocks
    reason = f"The largest no-recompute share that fits with a {margin(plan.limit) / GIB:.1f} GiB margin."
    return replace(plan, share=share, expected_peak=plan.peak_at(share), reason=(note + " " + reason).strip())


def _streaming(plan: MemoryPlan, nbytes: int) -> MemoryPlan:
    """`plan` (every block recomputed) with `nbytes` of base weights streamed: uncompiled blocks from then on."""
    streamed = replace(plan.uncompiled(), stream_bytes=nbytes)
    return replace(streamed, expected_peak=streamed.peak_at(1.0))


def _streamed(plan: MemoryPlan, room: int) -> MemoryPlan | None:
    """The fewest streamed bytes (never fewer than the plan streams already) whose expected peak fits `room`;
    None where even streaming every streamable byte does not fit (or nothing can stream)."""
    if plan.streamable <= 0:
        return None
    eager = plan.uncompiled()
    need = max(1, eager.peak_at(1.0, stream=0) + eager.stream_work - room, plan.stream_bytes)
    if need > plan.streamable:
        return None
    return _streaming(plan, need)


def check_first_step(plan: MemoryPlan, measured_peak: int) -> MemoryPlan:
    """Correct an auto plan with the peak the first step measured: when it is higher than expected, the
    activation part of the estimate is scaled by measured / expected and the share chosen again. A lower peak
    keeps the plan (on a capped device the allocator's fragmentation, which the peak does not show, used the
    difference: Klein 9B with fp8 weights under 16 GiB ran out of memory after lowering the share). Other
    plans are returned as they are."""
    if plan.mode != "auto" or plan.limit is None or plan.estimate is None or plan.expected_peak is None:
        return plan
    base_part = plan.fixed - plan.estimate.work
    streaming = plan.stream_bytes - plan.stream_work if plan.stream_bytes else 0
    expected_act = plan.expected_peak - base_part + streaming
    measured_act = measured_peak - base_part + streaming
    if expected_act <= 0 or measured_act <= expected_act:
        return plan
    factor = measured_act / expected_act

    def scaled(est: ActivationEstimate) -> ActivationEstimate:
        return ActivationEstimate(int(est.per_block * factor), int(est.per_input * factor), int(est.work * factor))

    est = scaled(plan.estimate)
    eager = None if plan.eager is None else scaled(plan.eager)
    corrected = replace(plan, estimate=est, eager=eager, fixed=base_part + est.work)
    note = f"First step peaked at {measured_peak / GIB:.1f} GiB (estimated {plan.expected_peak / GIB:.1f})."
    return _choose(corrected, note)


def can_fall_back(plan: MemoryPlan) -> bool:
    """Whether an auto plan has a next step in the out-of-memory chain: least memory, the blocks' inputs in host
    memory, then more base weights streamed from host memory."""
    if plan.mode != "auto":
        return False
    return plan.share < 1.0 or not plan.offload or plan.stream_bytes < plan.streamable


def fall_back(plan: MemoryPlan, error: str) -> MemoryPlan:
    """After running out of memory, the next step of the chain: with part of the blocks kept, recompute every
    block; with every block recomputed, also keep their inputs in host memory; with that, stream base weights
    from host memory (what the estimate says fits, at least a margin's worth), and then twice as many, up to
    all of them."""
    first_line = error.strip().splitlines()[0][:160] if error.strip() else "out of memory"
    ran_out = f"Ran out of memory with {plan.share:.2f} recomputed"
    if plan.offload and plan.stream_bytes:
        ran_out += f" and {plan.stream_bytes / GIB:.1f} GiB streamed"
    ran_out += f" ({first_line})"
    if plan.share >= 1.0 and plan.offload and plan.stream_bytes < plan.streamable:
        step = margin(plan.limit) if plan.limit is not None else MARGIN_MIN
        estimated = _streamed(plan, plan.limit - margin(plan.limit)) if plan.limit is not None else None
        nbytes = max(2 * plan.stream_bytes, plan.stream_bytes + step, estimated.stream_bytes if estimated else 0)
        streamed = _streaming(plan, min(plan.streamable, nbytes))
        if plan.limit is None:
            streamed = replace(streamed, expected_peak=None)
        what = f"streaming {streamed.stream_bytes / GIB:.1f} GiB of the base weights from host memory"
        return replace(streamed, fell_back=True, reason=f"{ran_out}; fell back to {what}.")
    offload = plan.share >= 1.0
    then = "their inputs in host memory" if offload else "least memory"
    return replace(
        plan,
        share=1.0,
        offload=offload,
        expected_peak=replace(plan, offload=offload).peak_at(1.0) if plan.limit is not None else None,
        fell_back=True,
        reason=f"{ran_out}; fell back to {then}.",
    )
