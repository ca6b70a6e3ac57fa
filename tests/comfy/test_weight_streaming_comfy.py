"""Weight streaming through ComfyUI's own partial loading, in-process on the CPU with the tiny Klein.

On the CPU ComfyUI's load and offload devices are both the CPU, so nothing actually moves: these tests lock in
the bookkeeping that can be observed there: which modules ComfyUI marks as streamed (`comfy_cast_weights` set,
`prev_comfy_cast_weights` kept, `model_lowvram`, the loaded size), that the streamed modules still compute the
same, that async offload streams are off while weights stream, and that afterwards the MODEL is fully loaded
again with bit-identical weights and ComfyUI's flags as before. The bytes streamed on a GPU and the peak under a
cap are tests/gpu/test_weight_streaming_gpu.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

GIB = 2**30


@pytest.fixture
def loaded(comfy_root, tiny_model_file):
    """A fresh MODEL of the tiny Klein (fp8 weights, as the 10 GiB case loads them), fully loaded by ComfyUI."""
    import comfy.model_management as mm
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(tiny_model_file), model_options={"dtype": torch.float8_e4m3fn})
    mm.load_models_gpu([patcher], force_full_load=True)
    yield patcher
    mm.unload_all_models()


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _flags(patcher) -> dict[str, tuple[bool, bool]]:
    """Each castable module's (comfy_cast_weights, streamed by the partial load) as ComfyUI keeps them."""
    return {
        name: (bool(m.comfy_cast_weights), hasattr(m, "prev_comfy_cast_weights"))
        for name, m in patcher.model.named_modules()
        if hasattr(m, "comfy_cast_weights")
    }


def _forward(patcher) -> torch.Tensor:
    from klein_lora_lab.trainer_core.model.klein import klein_forward

    gen = torch.Generator().manual_seed(3)
    model = patcher.model.diffusion_model
    ctx_dim = model.txt_in.weight.shape[1]
    x, ctx = torch.randn(1, 128, 4, 4, generator=gen), torch.randn(1, 6, ctx_dim, generator=gen)
    with torch.no_grad():
        return klein_forward(model, x, torch.tensor([0.6]), ctx)


def test_partial_unload_streams_the_named_bytes_and_restore_brings_all_back(loaded, monkeypatch) -> None:
    """stream(n) has ComfyUI partially unload at least n bytes (whole modules, smallest first): those modules
    and only those are marked to cast their weights per call, the loaded size drops by exactly what stream
    reports, a second call for fewer bytes moves nothing, a larger one moves more; the streamed model computes
    the same; ComfyUI's async offload streams are off meanwhile. restore() loads the MODEL fully again: weights
    bit-identical, every flag as before, the streams back."""
    import comfy.model_management as mm
    from klein_lora_lab.nodes.comfy.model_env import PartialLoadStreamer

    monkeypatch.setattr(mm, "NUM_STREAMS", 2)  # as on an NVIDIA GPU
    before, flags, out = _state(loaded), _flags(loaded), _forward(loaded)
    size = loaded.model_size()
    assert loaded.loaded_size() == size and not loaded.model.model_lowvram
    streamer = PartialLoadStreamer(loaded)
    total = streamer.streamable()
    assert 0.9 * size < total <= size

    got = streamer.stream(total // 3)
    assert total // 3 <= got < total and mm.NUM_STREAMS == 0
    streamed = [m for m in loaded.model.modules() if hasattr(m, "prev_comfy_cast_weights")]
    assert streamed and all(m.comfy_cast_weights for m in streamed)
    assert sum(mm.module_size(m) for m in streamed) == got
    assert loaded.model.model_lowvram and loaded.loaded_size() == size - got
    assert streamer.stream(total // 4) == got  # fewer than already streamed: nothing moves
    more = streamer.stream(total // 2)
    assert more >= total // 2 and loaded.loaded_size() == size - more
    torch.testing.assert_close(_forward(loaded), out, rtol=0, atol=0)

    streamer.restore()
    assert mm.NUM_STREAMS == 2 and streamer.streamed == 0
    assert not loaded.model.model_lowvram and loaded.loaded_size() == size
    assert _flags(loaded) == flags
    after = _state(loaded)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before)


def test_reload_after_a_vae_decode_streams_the_same_bytes(loaded, monkeypatch) -> None:
    """A VAE decode between steps may unload the MODEL: reload puts it back with the streamed modules left in
    host memory again (not the full load reload_model does without streaming); when nothing moved it, reload
    loads nothing."""
    import comfy.model_management as mm
    from klein_lora_lab.nodes.comfy.model_env import PartialLoadStreamer, reload_model

    streamer = PartialLoadStreamer(loaded)
    got = streamer.stream(streamer.streamable() // 2)
    calls: list[object] = []
    real_load = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: (calls.append(a), real_load(*a, **k))[1])
    reload_model(loaded, streamer)
    assert calls == [] and loaded.loaded_size() == loaded.model_size() - got
    mm.unload_all_models()  # what freeing memory for the VAE may do
    assert loaded.loaded_size() == 0
    reload_model(loaded, streamer)
    assert len(calls) == 1 and streamer.streamed >= got and loaded.model.model_lowvram
    assert loaded.loaded_size() == loaded.model_size() - streamer.streamed
    streamer.restore()
    assert not loaded.model.model_lowvram and loaded.loaded_size() == loaded.model_size()


def test_dynamic_vram_patchers_stream_nothing(loaded, monkeypatch) -> None:
    """A patcher with ComfyUI's dynamic VRAM pages its weights itself: the streamer offers nothing to stream."""
    from klein_lora_lab.nodes.comfy.model_env import PartialLoadStreamer

    monkeypatch.setattr(loaded, "is_dynamic", lambda: True)
    assert PartialLoadStreamer(loaded).streamable() == 0


def test_train_in_comfy_streams_what_the_plan_asks(loaded, tmp_path: Path, monkeypatch) -> None:
    """train_in_comfy hands the trainer its ComfyUI streamer: a plan that streams half the weights trains with
    those modules streamed in every forward, the node's memory line says how much, the losses equal a run
    without streaming, and after the run the MODEL is fully loaded again with bit-identical weights."""
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.nodes.comfy.training import train_in_comfy
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
    from klein_lora_lab.trainer_core.training import trainer
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    real_plan, real_forward = trainer.plan_memory, trainer.klein_forward
    streamed_in_forward: list[int] = []

    def plan(*args, **kwargs):
        """The plan under a budget that leaves room for half the weights (the CPU has no budget to read)."""
        made = real_plan(*args, **kwargs)
        return replace(made, mode="auto", share=1.0, offload=True, stream_bytes=args[7] // 2, compiled=False)

    def forward(*args, **kwargs):
        model = args[0]
        streamed_in_forward.append(sum(1 for m in model.modules() if hasattr(m, "prev_comfy_cast_weights")))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(trainer, "klein_forward", forward)
    register_runs_folder()
    model = loaded.model.diffusion_model
    gen = torch.Generator().manual_seed(2)
    ctx_dim = model.txt_in.weight.shape[1]
    items = [TrainItem(torch.randn(128, 2, 2, generator=gen), torch.randn(3, ctx_dim, generator=gen)) for _ in "ab"]
    settings = TrainSettings(rank=4, alpha=4, steps=2, checkpoint_every=0, sample_every=0, memory_mode="auto")
    before, flags = _state(loaded), _flags(loaded)

    plain = RunFolder.create(tmp_path / "plain", settings, {})
    with torch.inference_mode():
        train_in_comfy(loaded, items, settings, plain, False, None, None, None)
    assert not any(streamed_in_forward)
    streamed_in_forward.clear()

    monkeypatch.setattr(trainer, "plan_memory", plan)
    run = RunFolder.create(tmp_path / "streamed", settings, {})
    with torch.inference_mode():
        outcome = train_in_comfy(loaded, items, settings, run, False, None, None, None)
    assert outcome.result.steps_done == 2
    assert streamed_in_forward and all(n > 0 for n in streamed_in_forward)
    line = next(n for n in outcome.notices if n.startswith("memory"))
    assert "of the base weights from host memory each step (slower)" in line
    assert [r["loss"] for r in run.read_metrics()] == [r["loss"] for r in plain.read_metrics()]
    assert not loaded.model.model_lowvram and loaded.loaded_size() == loaded.model_size()
    assert _flags(loaded) == flags
    after = _state(loaded)
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before)
