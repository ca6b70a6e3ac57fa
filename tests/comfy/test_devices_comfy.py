"""Several devices through the real ComfyUI server on the tiny Klein, with devices 'cpu, cpu':

* Klein Sweep: the runs go to two worker processes that load the MODEL's file again (the loader's record), and each
  run is bit-identical to the run the Train node trains alone in the server with the same widgets.
* Klein Train LoRA: one run over two processes (gloo), batch_size 1 per process, has the losses of the run trained
  alone with batch_size 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness.fixtures import tiny_conditioning_path
from harness.prompts import train_prompt
from harness.workflow_prompt import make_album
from safetensors.torch import load_file

SWEEP = "devs"
VALUES = (1e-3, 5e-3)
RUNS = [f"{SWEEP}-learning_rate-{v:g}" for v in VALUES]
STEPS = 4
EVERY = 2


def sweep_prompt(album: Path, cond_file: Path, name: str = SWEEP, steps: int = STEPS) -> dict[str, Any]:
    """The training graph of harness.prompts with a Sweep over the learning rate on two CPU workers."""
    prompt = {k: v for k, v in train_prompt(album, cond_file, "unused", steps).items() if k in "12345"}
    widgets = dict(preset="style", rank=4, alpha=0.0, learning_rate=0.0, steps=steps, batch_size=1)
    widgets.update(checkpoint_every=EVERY, sample_every=0, sample_steps=2, sample_cfg=1.0, seed=3)
    widgets.update(targets="attention", validation_every=2, validation_holdout=0.0)
    prompt["6"] = {
        "class_type": "KleinLabSweep",
        "inputs": {
            "model": ["1", 0],
            "encoded_dataset": ["5", 0],
            "sweep_name": name,
            "knob": "learning_rate",
            "values": ", ".join(f"{v:g}" for v in VALUES),
            "devices": "cpu, cpu",
            **widgets,
        },
    }
    return prompt


@pytest.fixture(scope="module")
def device_sweep(comfy_server, tiny_spec) -> dict[str, Any]:
    """Queue the sweep on two workers, then train both runs alone with the Train node."""
    cond_file = tiny_conditioning_path(tiny_spec, tokens=8)
    album = make_album(comfy_server.base_dir / "input" / "album_devices", label="devices", tint=31)
    before = len(comfy_server.log_text())  # the server's log from here on is this sweep's (and its runs')
    outputs = comfy_server.run_prompt(sweep_prompt(album, cond_file), timeout_s=600)
    log = comfy_server.log_text()[before:]
    for i, lr in enumerate(VALUES):
        alone = train_prompt(album, cond_file, f"devalone{i}", STEPS, checkpoint_every=EVERY, sample_every=0)
        alone["6"]["inputs"].update(learning_rate=lr, validation_every=2)
        comfy_server.run_prompt(alone, timeout_s=600)
    return {"outputs": outputs, "log": log, "root": comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"}


def test_sweep_on_two_workers_reports_its_devices(device_sweep, comfy_server) -> None:
    """The node's closing text names the devices the runs were trained on; no worker process outlives it."""
    text = device_sweep["outputs"]["6"]["text"][0]
    assert f"Sweep '{SWEEP}' finished: 2 runs of learning_rate" in text and "on cpu, cpu" in text
    assert "Traceback" not in device_sweep["log"]


@pytest.mark.parametrize("index", [0, 1])
def test_each_worker_run_equals_the_run_trained_alone(device_sweep, index: int) -> None:
    """Each run trained by a worker has the settings, checkpoints (every tensor, bit for bit) and losses of the
    Train node's run alone in the server: the worker loaded the same model file and trained the same run."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder

    swept = RunFolder.open(device_sweep["root"] / RUNS[index])
    alone = RunFolder.open(device_sweep["root"] / f"devalone{index}")
    assert swept.settings == alone.settings and swept.settings.learning_rate == VALUES[index]
    assert [p.name for p in swept.checkpoints()] == [p.name for p in alone.checkpoints()] != []
    for a, b in zip(swept.checkpoints(), alone.checkpoints(), strict=True):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys()
        assert all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta), a.name
    assert [r["loss"] for r in swept.read_metrics()] == [r["loss"] for r in alone.read_metrics()]
    assert swept.meta["status"] == "finished"


def test_train_node_on_two_processes_matches_the_effective_batch(comfy_server, tiny_spec) -> None:
    """The Train node with devices 'cpu, cpu' and batch_size 1 trains the run of batch 2 (run.json says so) on two
    gloo processes; its losses equal, within float tolerance, those of the Train node alone with batch_size 2,
    and its checkpoints are the same steps."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder

    cond_file = tiny_conditioning_path(tiny_spec, tokens=8)
    album = make_album(comfy_server.base_dir / "input" / "album_dp", label="dp", tint=41)
    root = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    prompts = {}
    for name, batch, devices in (("dp2", 1, "cpu, cpu"), ("dpalone", 2, "")):
        prompt = train_prompt(album, cond_file, name, STEPS, checkpoint_every=EVERY, sample_every=0)
        prompt["6"]["inputs"].update(batch_size=batch, devices=devices, learning_rate=5e-3)
        prompts[name] = comfy_server.run_prompt(prompt, timeout_s=600)
    assert "over cpu, cpu" in prompts["dp2"]["6"]["text"][0]
    dp, alone = RunFolder.open(root / "dp2"), RunFolder.open(root / "dpalone")
    assert dp.settings == alone.settings and dp.settings.batch_size == 2
    assert [p.name for p in dp.checkpoints()] == [p.name for p in alone.checkpoints()] != []
    losses = [r["loss"] for r in alone.read_metrics()]
    assert [r["loss"] for r in dp.read_metrics()] == pytest.approx(losses, rel=1e-5, abs=1e-7)
    assert dp.meta["status"] == "finished"


def test_worker_progress_shows_one_bar_and_a_line_per_worker(comfy_root) -> None:
    """The Sweep node's progress on several devices: one bar over every run's steps, and per run a line with its
    device, label, step and loss, which says 'stopped' or 'finished' at the end."""
    from klein_lora_lab.nodes.comfy.feedback import WorkersProgress

    progress = WorkersProgress(None, {0: ("learning_rate=0.001", 4), 1: ("learning_rate=0.005", 4)})
    progress.event(("started", 0, "cuda:0"))
    progress.event(("started", 1, "cuda:1"))
    progress.event(("step", 0, 3, 4, 0.25, 1e-3, 0.1))
    progress.event(("step", 1, 2, 4, 0.5, 5e-3, 0.1))
    assert progress.bar.current == 5 and progress.bar.total == 8
    assert progress.line(0) == "cuda:0 · learning_rate=0.001 · step 3/4 · loss 0.2500"
    assert progress.line(1) == "cuda:1 · learning_rate=0.005 · step 2/4 · loss 0.5000"
    progress.event(("done", 1, "cuda:1", 2, True, None, 0.5, ()))
    assert progress.line(1) == "cuda:1 · learning_rate=0.005 · stopped at step 2"


def test_worker_model_source_loads_the_same_file_and_refuses_patched_models(comfy_root, tiny_model_file) -> None:
    """A MODEL from load_diffusion_model gives its loader's record; loading it again (as a worker does) gives the
    same weights; a MODEL with a LoRA patched in upstream is refused with the fix."""
    import comfy.model_management as mm
    import comfy.sd
    from klein_lora_lab.nodes.comfy.worker_model import WorkerModelError, model_source

    patcher = comfy.sd.load_diffusion_model(str(tiny_model_file))
    source = model_source(patcher)
    assert source.loader == "comfy.sd:load_diffusion_model" and source.args[0] == str(tiny_model_file)
    previous = mm.in_training
    try:
        module = source.load(torch.device("cpu"))
    finally:
        mm.in_training = previous
    original = patcher.model.diffusion_model.state_dict()
    assert module.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in module.state_dict().items())
    patched = patcher.clone()
    key = next(k for k in patched.model.state_dict() if k.endswith("img_in.weight"))
    patched.add_patches({key: (torch.zeros_like(patched.model.state_dict()[key]),)}, 1.0)
    with pytest.raises(WorkerModelError, match="LoRA loaded before this node"):
        model_source(patched)


def _children(pid: int) -> list[str]:
    """Command lines of the live child processes of `pid` (multiprocessing's resource tracker left out: it
    serves the whole server, not one sweep)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended while we looked
        if int(fields[1]) == pid and fields[0] != "Z" and "resource_tracker" not in cmdline:
            found.append(cmdline)
    return found


def test_cancel_stops_every_worker_and_keeps_every_run(comfy_server, tiny_spec) -> None:
    """Cancel while both workers train ends the prompt as interrupted; each run keeps a resumable checkpoint of
    the step it stopped at (run.json: interrupted, the manifest: partial), and no worker process outlives it."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step

    cond_file = tiny_conditioning_path(tiny_spec, tokens=8)
    album = make_album(comfy_server.base_dir / "input" / "album_devcancel", label="devcancel", tint=37)
    root = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    runs = [f"devcancel-learning_rate-{v:g}" for v in VALUES]
    prompt_id = comfy_server.queue_prompt(sweep_prompt(album, cond_file, "devcancel", steps=400))
    deadline = time.monotonic() + 300
    firsts = [root / r / "checkpoints" / f"step_{EVERY:06d}.safetensors" for r in runs]
    while not all(p.exists() for p in firsts):
        assert time.monotonic() < deadline, comfy_server.log_tail()
        time.sleep(0.1)
    comfy_server.interrupt()
    entry = comfy_server.wait_history(prompt_id, timeout_s=300)
    assert entry["status"]["status_str"] == "error"
    for name in runs:
        run = RunFolder.open(root / name)
        assert run.meta["status"] == "interrupted"
        assert EVERY <= checkpoint_step(run.latest_resumable()) < 400
    manifest = json.loads((root / "devcancel.sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["partial", "partial"]
    deadline = time.monotonic() + 30
    while _children(comfy_server.process.pid):
        assert time.monotonic() < deadline, _children(comfy_server.process.pid)
        time.sleep(0.2)


def test_cancel_of_a_data_parallel_run_keeps_it(comfy_server, tiny_spec) -> None:
    """Cancel during a Train-node run on 'cpu, cpu' ends the prompt as interrupted; rank 0 kept a resumable
    checkpoint of the step both ranks stopped at (run.json: interrupted) and no rank outlives it."""
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step

    cond_file = tiny_conditioning_path(tiny_spec, tokens=8)
    album = make_album(comfy_server.base_dir / "input" / "album_dpcancel", label="dpcancel", tint=43)
    root = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    prompt = train_prompt(album, cond_file, "dpcancel", 400, checkpoint_every=1, sample_every=0)
    prompt["6"]["inputs"].update(devices="cpu, cpu")
    prompt_id = comfy_server.queue_prompt(prompt)
    first = root / "dpcancel" / "checkpoints" / "step_000001.safetensors"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert time.monotonic() < deadline, comfy_server.log_tail()
        time.sleep(0.1)
    comfy_server.interrupt()
    entry = comfy_server.wait_history(prompt_id, timeout_s=300)
    assert entry["status"]["status_str"] == "error"
    run = RunFolder.open(root / "dpcancel")
    assert run.meta["status"] == "interrupted" and 1 <= checkpoint_step(run.latest_resumable()) < 400
    deadline = time.monotonic() + 30
    while _children(comfy_server.process.pid):
        assert time.monotonic() < deadline, _children(comfy_server.process.pid)
        time.sleep(0.2)
