"""Unit tests of the training loop on a tiny Klein: determinism, exact resume, NaN guard, callbacks, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness.callbacks import StopAt
from klein_lora_lab.trainer_core.lora.adapters import LoraTrainable
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.model.klein import klein_forward
from klein_lora_lab.trainer_core.model.targeting import resolve_targets
from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_conditioning, tiny_klein
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.data import TrainItem
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import NonFiniteLossError, TrainCallbacks, lr_at, train

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
BASE = dict(rank=4, alpha=4, learning_rate=1e-3, steps=6, checkpoint_every=3, save_dtype="fp32")


def _items(n: int = 4, refs: bool = False) -> list[TrainItem]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        size = (2, 2) if i % 2 == 0 else (2, 3)  # two buckets
        ref = (torch.randn(128, 2, 2, generator=g),) if refs else ()
        ctx = torch.randn(3 + i, 16, generator=g)
        out.append(TrainItem(torch.randn(128, *size, generator=g), ctx, ref, name=f"img{i}"))
    return out


def _train(path: Path, settings: TrainSettings, items=None, callbacks=None, resume=False, **kw):
    run = RunFolder.open(path) if resume else RunFolder.create(path, settings, {"trigger": "TOK"})
    return run, train(tiny_klein(SPEC), items or _items(), settings, run, callbacks, resume=resume, **kw)


def _losses(run: RunFolder) -> list[float]:
    return [r["loss"] for r in run.read_metrics()]


def test_fresh_lora_from_targets_leaves_outputs_identical() -> None:
    """A LoRA initialised for every Linear of the model (B = 0) does not change the prediction at all."""
    model = tiny_klein(SPEC)
    lora = LoraTrainable(resolve_targets(model, "regex:.*"), 4, 4, generator=torch.Generator().manual_seed(0))
    x, ctx = torch.randn(1, 128, 2, 2), tiny_conditioning(SPEC, 4)
    with torch.no_grad():
        assert torch.equal(
            klein_forward(model, x, torch.tensor([0.4]), ctx),
            klein_forward(model, x, torch.tensor([0.4]), ctx, adapters=lora),
        )


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    """Init, data order, noise and σ are seeded: equal seeds give equal losses and weights, another seed differs."""
    s = TrainSettings(**BASE)
    _, a = _train(tmp_path / "a", s)
    run_b, b = _train(tmp_path / "b", s)
    run_c, c = _train(tmp_path / "c", TrainSettings(**{**BASE, "seed": 1}))
    assert _losses(RunFolder.open(tmp_path / "a")) == _losses(run_b)
    assert _losses(run_b) != _losses(run_c)
    for name, w in a.lora.weights().items():
        assert torch.equal(w.up, b.lora.weights()[name].up)


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """A run stopped at step 3 (should_stop) and resumed has exactly the loss trajectory and final LoRA of a run
    that never stopped, with batches, accumulation, caption dropout, references and a cosine schedule in play."""
    s = TrainSettings(
        **{**BASE, "steps": 7, "checkpoint_every": 2},
        batch_size=2,
        grad_accum=2,
        caption_dropout=0.3,
        lr_schedule="cosine",
        warmup_steps=2,
        validation_every=3,
    )
    items = _items(5, refs=True)
    empty = torch.zeros(1, 16)
    full_run, full = _train(tmp_path / "full", s, items, empty_context=empty)
    part_run, part = _train(tmp_path / "part", s, items, StopAt(3), empty_context=empty)
    assert part.stopped_early and part.steps_done == 3
    assert part.last_checkpoint == part_run.checkpoint_path(3)
    resumed_run, resumed = _train(tmp_path / "part", s, items, resume=True, empty_context=empty)
    assert resumed.steps_done == 7 and not resumed.stopped_early
    assert _losses(resumed_run) == _losses(full_run)
    assert [r.get("val_loss") for r in resumed_run.read_metrics()] == [
        r.get("val_loss") for r in full_run.read_metrics()
    ]
    for name, w in full.lora.weights().items():
        assert torch.equal(w.down, resumed.lora.weights()[name].down)
        assert torch.equal(w.up, resumed.lora.weights()[name].up)


def test_interrupting_callback_keeps_the_last_step(tmp_path: Path) -> None:
    """An exception raised by a callback (ComfyUI's interrupt is a BaseException) saves the finished step first."""

    class Interrupt(BaseException):
        pass

    class Cancel(TrainCallbacks):
        def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
            if step == 2:
                raise Interrupt()

    with pytest.raises(Interrupt):
        _train(tmp_path, TrainSettings(**BASE), callbacks=Cancel())
    run = RunFolder.open(tmp_path)
    assert run.latest_resumable() == run.checkpoint_path(2) and run.meta["status"] == "interrupted"


def test_poisoned_item_stops_with_a_clear_message(tmp_path: Path) -> None:
    """A NaN in the data stops training at the first step that sees it, names the item and the last good
    checkpoint, and writes no checkpoint for the bad step."""
    items = _items(2)
    items.append(TrainItem(torch.full((128, 2, 2), float("nan")), torch.randn(3, 16), name="broken.png"))
    s = TrainSettings(**{**BASE, "steps": 20, "checkpoint_every": 1})
    with pytest.raises(NonFiniteLossError) as err:
        _train(tmp_path, s, items)
    run = RunFolder.open(tmp_path)
    message = str(err.value)
    assert f"step {err.value.step}" in message and "broken.png" in message
    assert [p.name for p in run.checkpoints()][-1:] == (
        [f"step_{err.value.step - 1:06d}.safetensors"] if err.value.step > 1 else []
    )
    for path in run.checkpoints():
        weights, _ = load_lora(path)
        assert all(torch.isfinite(w.up).all() for w in weights.values())
    assert run.meta["status"] == "diverged"


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    """Weights that blew up (as a far too high learning rate does; simulated by writing Inf into the LoRA after
    step 2) stop training before any checkpoint of them is written; the message says to lower the learning
    rate and names the last good checkpoint (step 1)."""

    class BlowUp(TrainCallbacks):
        def on_validation(self, step: int, lora: LoraTrainable) -> None:
            if step == 2:
                next(iter(lora.up.values())).fill_(float("inf"))

    s = TrainSettings(**{**BASE, "checkpoint_every": 1}, sample_every=1)
    with pytest.raises(NonFiniteLossError) as err:
        _train(tmp_path, s, callbacks=BlowUp())
    run = RunFolder.open(tmp_path)
    assert err.value.step == 2 and "lower learning_rate" in str(err.value) and "step_000001" in str(err.value)
    assert [p.name for p in run.checkpoints()] == ["step_000001.safetensors"]
    assert err.value.last_checkpoint == run.checkpoint_path(1)


def test_files_metrics_and_callbacks(tmp_path: Path) -> None:
    """Checkpoints at every checkpoint_every and at the end, equal to the returned LoRA; one metrics line per
    step with val_loss at validation_every; callbacks see every step, checkpoint and validation."""
    events: list[tuple] = []

    class Record(TrainCallbacks):
        def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
            events.append(("step", step, total))

        def on_checkpoint(self, step: int, path: Path) -> None:
            events.append(("ckpt", step, path.name))

        def on_validation(self, step: int, lora: LoraTrainable) -> None:
            assert not torch.is_grad_enabled()
            events.append(("val", step))

    s = TrainSettings(**{**BASE, "steps": 5, "checkpoint_every": 2}, sample_every=4, validation_every=2)
    run, result = _train(tmp_path, s, callbacks=Record())
    assert [p.name for p in run.checkpoints()] == [f"step_{k:06d}.safetensors" for k in (2, 4, 5)]
    assert ("ckpt", 5, "step_000005.safetensors") in events and ("val", 4) in events
    assert [e[1] for e in events if e[0] == "step"] == [1, 2, 3, 4, 5]
    records = run.read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    weights, meta = load_lora(result.last_checkpoint)
    assert (
        meta["klein_lab.step"] == "5"
        and meta["klein_lab.trigger"] == "TOK"
        and meta["klein_lab.targets"] == "attention"
    )
    for name, w in result.lora.weights().items():
        assert torch.equal(weights[name].up, w.up)
    assert run.meta["status"] == "finished" and result.final_loss == records[-1]["loss"]


def test_base_model_is_left_as_it_was(tmp_path: Path) -> None:
    """Training touches only LoRA tensors: base weights and their requires_grad flags are unchanged."""
    model = tiny_klein(SPEC)
    model.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = RunFolder.create(tmp_path, TrainSettings(**BASE), {})
    train(model, _items(), TrainSettings(**BASE), run)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_resume_guards(tmp_path: Path) -> None:
    """Resume refuses changed settings that alter the trajectory or a changed dataset; a fresh train refuses a
    folder that already has checkpoints; more steps may be added on resume."""
    s = TrainSettings(**BASE)
    _train(tmp_path, s)
    with pytest.raises(ValueError, match="resume=True"):
        train(tiny_klein(SPEC), _items(), s, RunFolder.open(tmp_path))
    with pytest.raises(ValueError, match="learning_rate"):
        _train(tmp_path, TrainSettings(**{**BASE, "learning_rate": 2e-3}), resume=True)
    with pytest.raises(ValueError, match="dataset differs"):
        _train(tmp_path, s, _items(3), resume=True)
    _, more = _train(tmp_path, TrainSettings(**{**BASE, "steps": 8}), resume=True)
    assert more.steps_done == 8


def test_caption_dropout_needs_the_empty_prompt(tmp_path: Path) -> None:
    """caption_dropout > 0 without empty_context is refused with the fix in the message."""
    with pytest.raises(ValueError, match="empty_context"):
        _train(tmp_path, TrainSettings(**BASE, caption_dropout=0.1))


def test_lr_schedule_warmup_and_cosine() -> None:
    """Linear warmup to the base lr, then cosine down to 0 at the last step; constant stays flat."""
    s = TrainSettings(learning_rate=1e-3, steps=10, warmup_steps=2, lr_schedule="cosine")
    assert [round(lr_at(s, k), 8) for k in (1, 2)] == [5e-4, 1e-3]
    assert lr_at(s, 6) == pytest.approx(5e-4) and lr_at(s, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainSettings(learning_rate=1e-3), 500) == 1e-3


def test_training_works_when_called_under_inference_mode(tmp_path: Path) -> None:
    """ComfyUI executes nodes under torch.inference_mode(): train() creates its LoRA and batches outside it, so
    items made under inference mode still train, and the result is the same as outside inference mode."""
    with torch.inference_mode():
        items = [TrainItem(it.latent.clone(), it.context.clone(), name=it.name) for it in _items(2)]
    s = TrainSettings(**{**BASE, "steps": 2})
    model = tiny_klein(SPEC)  # the node glue turns ComfyUI's inference-mode weights into normal tensors
    with torch.inference_mode():
        inside = train(model, items, s, RunFolder.create(tmp_path / "a", s, {}))
    outside = train(tiny_klein(SPEC), _items(2), s, RunFolder.create(tmp_path / "b", s, {}))
    assert inside.final_loss == outside.final_loss
    assert not next(iter(inside.lora.parameters())).is_inference()


def test_batches_never_mix_sizes_and_cover_every_item() -> None:
    """Each epoch visits every item exactly once, a batch holds one latent size only, and the order is a pure
    function of (seed, micro-step): the same seed gives the same batches, another seed another order."""
    from klein_lora_lab.trainer_core.training.data import BatchOrder

    items = _items(7)
    order = BatchOrder(items, batch_size=2, seed=3)
    assert order.batches_per_epoch == 2 + 2  # 4 items of 2x2 and 3 of 2x3, in batches of at most 2
    for epoch in range(3):
        batches = [order.batch(epoch * order.batches_per_epoch + j) for j in range(order.batches_per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(7))
        assert all(len({items[i].latent.shape for i in b}) == 1 for b in batches)
    again, other = BatchOrder(items, 2, seed=3), BatchOrder(items, 2, seed=4)
    assert [again.batch(m) for m in range(12)] == [order.batch(m) for m in range(12)]
    assert [other.batch(m) for m in range(12)] != [order.batch(m) for m in range(12)]
