"""Weight streaming in the auto memory plan, under a simulated memory budget: where every block recomputed with
its inputs in host memory does not fit, auto leaves the fewest bytes of base weights in host memory that make the
estimate fit, recomputes every block, runs the blocks uncompiled and says so; the out-of-memory fallback chain
ends in streaming; the trainer asks its streamer for the plan's bytes. (The ComfyUI side, the partial unload
itself, is tests/comfy/test_weight_streaming_comfy.py; the real budget, tests/gpu/test_weight_streaming_gpu.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.model.klein import KleinShape
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training import memory, trainer
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.faults import TrainingOutOfMemoryError
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train

GIB = 2**30
KLEIN_9B = KleinShape(hidden=4096, heads=32, double_blocks=8, single_blocks=24, context_dim=12288)
TOKENS_1024 = 64 * 64 + 512
H = 4096
STREAM_WORK_9B = 2 * 26 * H * H + 4 * 9 * H * H  # a double block's weights in bf16, single linear1 in fp32
FP8_WEIGHTS_9B = int(8.4 * GIB)
LORA_9B = 83_000_000  # rank 32 on every block Linear
SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
BASE = dict(rank=4, alpha=4, learning_rate=1e-3, steps=3, checkpoint_every=3, save_dtype="fp32")


class FakeProbe:
    """A memory budget on the CPU: `in_use` held now, `limit` the most the process may hold."""

    def __init__(self, in_use: int, limit: int) -> None:
        self.in_use, self.limit = in_use, limit

    def budget(self) -> memory.MemoryBudget:
        return memory.MemoryBudget(self.in_use, self.limit)

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return 1


class FakeStreamer:
    """Records what the trainer asks to stream; rounds up to whole 'modules' of `module` bytes as ComfyUI does."""

    def __init__(self, total: int, module: int = 1) -> None:
        self.total, self.module, self.asked, self.streamed = total, module, [], 0

    def streamable(self) -> int:
        return self.total

    def stream(self, nbytes: int) -> int:
        self.asked.append(nbytes)
        self.streamed = min(self.total, max(self.streamed, -(-nbytes // self.module) * self.module))
        return self.streamed


class Notices(TrainCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_notice(self, text: str) -> None:
        self.lines.append(text)


def _items(n: int = 3) -> list[TrainItem]:
    g = torch.Generator().manual_seed(5)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), name=f"i{i}") for i in range(n)
    ]


def _plan_9b(limit_gib: float, streamable: int = FP8_WEIGHTS_9B, compiled: bool = True) -> memory.MemoryPlan:
    """Klein 9B with fp8 weights (fp8 compute: no cast copies) at 1024², the weights loaded on the device."""
    probe = FakeProbe(FP8_WEIGHTS_9B, int(limit_gib * GIB))
    settings = TrainSettings(memory_mode="auto", rank=32)
    return memory.plan_memory(settings, KLEIN_9B, TOKENS_1024, compiled, LORA_9B, probe, 0, streamable, STREAM_WORK_9B)


def test_auto_streams_the_fewest_bytes_that_fit_under_10_gib() -> None:
    """Klein 9B fp8 under 10 GiB: least memory with the inputs in host memory does not fit, so auto streams
    the fewest bytes whose expected peak fits the limit minus the margin (one byte fewer would not), recomputes
    every block with their inputs on the host, turns block compilation off and says so on the node's line."""
    plan = _plan_9b(10.0)
    room = plan.limit - memory.margin(plan.limit)
    assert plan.share == 1.0 and plan.offload and not plan.compiled
    assert 0 < plan.stream_bytes < plan.streamable
    assert plan.expected_peak <= room < plan.peak_at(1.0, stream=plan.stream_bytes - 1)
    assert plan.peak_at(1.0, stream=0) > room  # not streaming would not fit
    line = plan.describe()
    gib = f"{plan.stream_bytes / GIB:.1f} GiB"
    assert f"streaming {gib} of the base weights from host memory each step (slower)" in line
    assert "blocks uncompiled while weights stream" in line
    assert 2.0 < plan.stream_bytes / GIB < 4.0  # by the estimate: ~2.9 GiB of the 8.4


def test_streaming_uses_the_uncompiled_estimate() -> None:
    """Streamed weights run the blocks uncompiled, whose activations are larger: a compiled run streams the same
    bytes as an uncompiled one would (its estimate switched to eager), not fewer."""
    assert _plan_9b(10.0, compiled=True).stream_bytes == _plan_9b(10.0, compiled=False).stream_bytes
    assert _plan_9b(10.0).estimate == _plan_9b(10.0, compiled=False).estimate


def test_auto_streams_nothing_where_less_suffices_or_nothing_can_stream() -> None:
    """With room for the weights, auto does not stream (12 GiB: inputs in host memory; 14 GiB: part of the blocks
    kept); without a streamer (streamable 0) or with too little to stream, the reason says it may not fit and
    what to lower."""
    assert _plan_9b(12.0).stream_bytes == 0 and _plan_9b(12.0).offload and _plan_9b(12.0).compiled
    assert _plan_9b(14.0).stream_bytes == 0 and _plan_9b(14.0).share < 1.0
    none = _plan_9b(10.0, streamable=0)
    assert none.stream_bytes == 0 and "may not fit: lower the resolution or batch" in none.reason
    little = _plan_9b(10.0, streamable=GIB)
    assert little.stream_bytes == GIB and "not even with every base weight streamed" in little.reason
    assert "lower the resolution or batch" in little.describe()


def test_first_step_peak_raises_the_streamed_bytes() -> None:
    """A first step that peaks higher than the estimate streams more (never less), and still fits its new
    estimate."""
    plan = _plan_9b(10.0)
    checked = memory.check_first_step(plan, plan.expected_peak + GIB // 2)
    room = plan.limit - memory.margin(plan.limit)
    assert checked.stream_bytes > plan.stream_bytes and checked.expected_peak <= room
    assert "First step peaked" in checked.reason
    assert memory.check_first_step(plan, plan.expected_peak - GIB) == plan


def test_the_out_of_memory_chain_ends_in_streaming() -> None:
    """From part of the blocks kept: least memory, then the inputs in host memory, then streamed weights (at
    least a margin's worth), then twice as many, until everything streams and the chain ends."""
    plan = _plan_9b(14.0)
    steps = []
    while memory.can_fall_back(plan):
        plan = memory.fall_back(plan, "CUDA out of memory. Tried to allocate 1.00 GiB")
        steps.append(plan)
    assert (steps[0].share, steps[0].offload, steps[0].stream_bytes) == (1.0, False, 0)
    assert steps[1].offload and steps[1].stream_bytes == 0
    assert steps[2].stream_bytes >= memory.margin(plan.limit) and not steps[2].compiled
    assert "fell back to streaming" in steps[2].reason and "streaming" in steps[2].describe()
    sizes = [p.stream_bytes for p in steps[2:]]
    assert all(b >= 2 * a or b == plan.streamable for a, b in zip(sizes, sizes[1:], strict=False))
    assert sizes[-1] == plan.streamable and all(p.fell_back for p in steps)
    nothing = memory.fall_back(memory.fall_back(_plan_9b(14.0, streamable=0), "oom"), "oom")
    assert nothing.offload and nothing.stream_bytes == 0 and not memory.can_fall_back(nothing)


def _forward_spy(monkeypatch, fail) -> list[tuple]:
    """klein_forward records (share, compile, offload) and raises out of memory where `fail(...)` says so."""
    real = trainer.klein_forward
    calls: list[tuple] = []

    def forward(*args, **kwargs):
        share, compiled, offload = args[6], args[7], args[9]
        calls.append((share, compiled, offload))
        if fail(share, compiled, offload):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args[:7], False, *args[8:], **kwargs)  # the CPU test never compiles

    monkeypatch.setattr(trainer, "klein_forward", forward)
    return calls


def test_trainer_streams_what_the_plan_says_and_runs_uncompiled(tmp_path: Path, monkeypatch) -> None:
    """A plan that streams asks the streamer for its bytes before the first step, reports what actually went
    (whole modules), and every forward runs uncompiled with every block recomputed and its inputs on the host;
    the losses equal a least memory run's (streaming moves weights, it changes no math). Without anything to
    stream the plan says it may not fit."""
    calls = _forward_spy(monkeypatch, lambda *a: False)
    s = TrainSettings(**BASE, memory_mode="auto", compile_blocks="on")
    probe = FakeProbe(in_use=9 * GIB, limit=int(9.2 * GIB))  # the weights alone exceed the limit minus the margin
    notices = Notices()
    train(tiny_klein(SPEC), _items(), s, RunFolder.create(tmp_path / "a", s, {}), notices, memory_probe=probe)
    assert "may not fit" in notices.lines[0] and "streaming" not in notices.lines[0]
    notices = Notices()
    calls.clear()
    streamer = FakeStreamer(4 * GIB, module=3 * 2**20)
    run = RunFolder.create(tmp_path / "b", s, {})
    train(tiny_klein(SPEC), _items(), s, run, notices, memory_probe=probe, weight_streamer=streamer)
    assert len(streamer.asked) == 1 and streamer.streamed >= streamer.asked[0] > 0
    assert streamer.streamed % (3 * 2**20) == 0
    assert f"streaming {streamer.streamed / GIB:.1f} GiB" in notices.lines[0]
    assert calls and all(c == (1.0, False, True) for c in calls)
    least = TrainSettings(**BASE, memory_mode="least_memory")
    ref = RunFolder.create(tmp_path / "c", least, {})
    train(tiny_klein(SPEC), _items(), least, ref)
    assert [r["loss"] for r in run.read_metrics()] == [r["loss"] for r in ref.read_metrics()]


def test_out_of_memory_in_the_trainer_falls_back_down_to_streaming(tmp_path: Path, monkeypatch) -> None:
    """A run planned with nothing recomputed that keeps running out of memory until weights stream goes down
    the whole chain within its first step (least memory, inputs on the host, streaming) and trains on; where
    nothing can stream it fails with the out-of-memory advice."""
    streamer = FakeStreamer(4 * GIB)
    calls = _forward_spy(monkeypatch, lambda share, compiled, offload: streamer.streamed == 0)
    s = TrainSettings(**BASE, memory_mode="auto")
    notices = Notices()
    run = RunFolder.create(tmp_path / "a", s, {})
    result = train(
        tiny_klein(SPEC), _items(), s, run, notices, memory_probe=FakeProbe(0, 10 * GIB), weight_streamer=streamer
    )
    assert result.steps_done == 3
    assert calls[:4] == [(0.0, False, False), (1.0, False, False), (1.0, False, True), (1.0, False, True)]
    assert "fell back to streaming" in notices.lines[3] and "streaming" in notices.lines[-1]
    assert memory.margin(10 * GIB) <= streamer.asked[0] < 4 * GIB
    _forward_spy(monkeypatch, lambda *a: True)
    with pytest.raises(TrainingOutOfMemoryError, match="out of device memory"):
        train(
            tiny_klein(SPEC),
            _items(),
            s,
            RunFolder.create(tmp_path / "b", s, {}),
            memory_probe=FakeProbe(0, 100 * GIB),
            weight_streamer=FakeStreamer(0),
        )


def test_a_streamed_run_resumes_exactly_and_run_json_keeps_no_plan(tmp_path: Path, monkeypatch) -> None:
    """The plan is made again by every run and never stored: a run that streamed, stopped after 2 steps and
    resumed without streaming (a larger budget) ends with the same losses as one run of 4 steps; run.json holds
    the settings only."""
    _forward_spy(monkeypatch, lambda *a: False)
    tight = FakeProbe(in_use=9 * GIB, limit=int(9.2 * GIB))
    roomy = FakeProbe(in_use=0, limit=100 * GIB)
    s2 = TrainSettings(**{**BASE, "steps": 2, "checkpoint_every": 2}, memory_mode="auto")
    s4 = TrainSettings(**{**BASE, "steps": 4, "checkpoint_every": 2}, memory_mode="auto")
    run = RunFolder.create(tmp_path / "a", s2, {})
    streamer = FakeStreamer(4 * GIB)
    train(tiny_klein(SPEC), _items(), s2, run, memory_probe=tight, weight_streamer=streamer)
    assert streamer.streamed > 0
    assert "stream" not in (tmp_path / "a" / "run.json").read_text()
    train(tiny_klein(SPEC), _items(), s4, run, memory_probe=roomy, weight_streamer=FakeStreamer(4 * GIB), resume=True)
    whole = RunFolder.create(tmp_path / "b", s4, {})
    train(tiny_klein(SPEC), _items(), s4, whole, memory_probe=roomy)
    assert [r["loss"] for r in run.read_metrics()] == [r["loss"] for r in whole.read_metrics()]
