"""The training panel's server side in a real ComfyUI: its routes (history, Stop & keep, Sample now, presets), the
live events' throttle, and the closing messages (Stop & keep, resuming a finished run).

Through the server: a long run is sampled on request and stopped with Stop & keep; the prompt ends as a success
whose outputs name the kept checkpoint, a prompt queued behind it runs normally, and resume continues the run to
its end. The history route reads the run folder (nothing outside the runs folder: hostile names are refused).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from harness.fixtures import tiny_conditioning_path
from harness.prompts import train_prompt, with_defaults
from harness.server import TINY_MODEL_NAME, ServerError
from harness.workflow_prompt import make_album

LONG = 5000


def runs_folder(server) -> Path:
    return server.base_dir / "output" / "klein_lora_lab" / "runs"


def wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cond_file(tiny_spec) -> Path:
    return tiny_conditioning_path(tiny_spec, tokens=8)


def history(server, run: str) -> dict:
    return server.get_json("/klein_lab/train/history?" + urllib.parse.urlencode({"run": run}))


def http_status(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON) of a GET (body None) or POST, without raising on 4xx."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_stop_and_keep_ends_as_success_and_resume_finishes(comfy_server, cond_file):
    """Sample now renders previews off the sample_every beat; Stop & keep stops the run after its current step: the
    prompt's status is success (not failed, not interrupted), its text names the kept checkpoint and how to
    resume, run.json says stopped, the next queued prompt runs; the history route shows points, checkpoints and
    samples; resume with the same settings runs to the end, and resuming the finished run says so and how to
    extend it."""
    album = make_album(comfy_server.base_dir / "input" / "album_panel", label="panel", tint=33)
    run_dir = runs_folder(comfy_server) / "panel_stop"
    prompt = train_prompt(album, cond_file, "panel_stop", LONG, checkpoint_every=3, sample_every=0)
    prompt_id = comfy_server.queue_prompt(with_defaults(comfy_server, prompt))
    behind = comfy_server.queue_prompt(
        {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_NAME, "weight_dtype": "default"}},
            "2": {"class_type": "KleinLabModelInfo", "inputs": {"model": ["1", 0]}},
        }
    )
    wait_for(run_dir / "checkpoints" / "step_000003.safetensors", 300)
    status, reply = http_status(comfy_server, "/klein_lab/train/sample", {"run": "panel_stop"})
    assert status == 200 and reply["run"] == "panel_stop"
    deadline = time.monotonic() + 120
    while not list((run_dir / "samples").glob("step_*_prompt0.png")):
        assert time.monotonic() < deadline, "Sample now produced no preview"
        time.sleep(0.2)
    status, reply = http_status(comfy_server, "/klein_lab/train/stop", {"run": "panel_stop"})
    assert status == 200, reply
    entry = comfy_server.wait_history(prompt_id, timeout_s=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert not any(m[0] in ("execution_interrupted", "execution_error") for m in entry["status"]["messages"])
    text = entry["outputs"]["6"]["text"][0]
    stopped = json.loads((run_dir / "run.json").read_text())["meta"]
    step = stopped["last_step"]
    kept = f"panel_stop/checkpoints/step_{step:06d}.safetensors"
    assert f"Stopped & kept at step {step}/{LONG}" in text and kept in text and "resume on" in text, text
    assert stopped["status"] == "stopped" and (run_dir / "checkpoints" / f"step_{step:06d}.state").is_file()
    assert comfy_server.wait_history(behind, timeout_s=120)["status"]["status_str"] == "success"

    h = history(comfy_server, "panel_stop")
    assert h["exists"] and h["live"] is None and h["status"] == "stopped" and h["total"] == LONG
    assert [p[0] for p in h["points"]] == list(range(1, step + 1))
    assert h["checkpoints"][-1] == {"step": step, "lora": kept}
    sampled = h["samples"][0]
    assert sampled["step"] % 3 != 0 or sampled["step"] <= step  # previews exist at the step they were asked for
    assert sampled["text"] == "a photo of TOK riding a bicycle"
    assert comfy_server.view_file(**{k: sampled["image"][k] for k in ("filename", "subfolder")})[:4] == b"\x89PNG"
    status, _ = http_status(comfy_server, "/klein_lab/train/stop", {"run": "panel_stop"})
    assert status == 409  # not training any more

    final = step + 2
    resumed = train_prompt(album, cond_file, "panel_stop", final, resume=True, checkpoint_every=3, sample_every=0)
    outputs = comfy_server.run_prompt(with_defaults(comfy_server, resumed), timeout_s=600)
    assert f"Finished {final} steps" in outputs["6"]["text"][0]
    resumed["6"]["inputs"]["sample_cfg"] = 1.5  # a changed widget: ComfyUI runs the node again instead of its cache
    again = comfy_server.run_prompt(with_defaults(comfy_server, resumed), timeout_s=600)
    message = again["6"]["text"][0]
    assert f"already finished at step {final}" in message and "raise steps above" in message, message
    assert again["6"].get("images", []) == []


def test_history_route_refuses_hostile_names(comfy_server, tmp_path):
    """The history, stop and sample routes validate the run name with the Train node's rule: separators, '..',
    NUL bytes, reserved and over-long names and a symlink planted in the runs folder are refused (400) without
    reading anything; an unknown valid name is reported as not existing."""
    outside = tmp_path / "outside_run"
    outside.mkdir()
    (outside / "run.json").write_text("{}")
    runs = runs_folder(comfy_server)
    runs.mkdir(parents=True, exist_ok=True)
    link = runs / "panel_linked_out"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    hostile = ["../../etc", "..", "a/b", "/etc", "x\x00y", "CON", "a" * 300, "panel_linked_out", "é*?", ""]
    for name in hostile:
        status, reply = http_status(comfy_server, "/klein_lab/train/history?" + urllib.parse.urlencode({"run": name}))
        assert status == 400 and "run name" in reply["error"], (name, reply)
        for action in ("stop", "sample"):
            status, reply = http_status(comfy_server, f"/klein_lab/train/{action}", {"run": name})
            assert status == 400, (name, action, reply)
    status, reply = http_status(comfy_server, "/klein_lab/train/stop", {"run": ["list"]})
    assert status == 400
    assert history(comfy_server, "no_such_run") == {"run": "no_such_run", "exists": False, "live": None}


def test_presets_route_matches_the_settings(comfy_server):
    """The panel fills rank/alpha/learning rate/steps from the same presets the trainer uses."""
    from klein_lora_lab.trainer_core.training.settings import PRESETS

    assert comfy_server.get_json("/klein_lab/train/presets") == PRESETS
    assert comfy_server.get_json("/api/klein_lab/train/presets") == PRESETS  # the frontend's fetchApi prefix


def test_step_events_are_throttled_and_complete(comfy_root, monkeypatch, tmp_path):
    """3000 steps reported as fast as possible send at most 10 step events per second plus the final one, and the
    points they carry are every step exactly once, in order (the chart misses nothing)."""
    from klein_lora_lab.nodes.comfy import live_panel

    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(live_panel, "broadcast", lambda event, data: sent.append((event, data)))
    start = time.perf_counter()
    with live_panel.LivePanel("throttle", "6", 3000, 0, tmp_path) as panel:
        for step in range(1, 3001):
            panel.on_step(step, 1.0 / step, None, False)
    elapsed = time.perf_counter() - start
    steps = [d for e, d in sent if e == "klein_lab.train.step"]
    assert len(steps) <= 10 * elapsed + 2, (len(steps), elapsed)
    points = [p[0] for d in steps for p in d["points"]]
    assert points == list(range(1, 3001))
    assert all(d["run"] == "throttle" and d["node"] == "6" for _, d in sent)
    assert live_panel.live_panel("throttle") is None  # unregistered when the run ends


def test_history_by_node_is_the_run_the_node_trains_now(comfy_root, monkeypatch, tmp_path):
    """A Sweep node's panel has no run name: after a reload it asks for the run its node trains now. While a run of
    node 6 trains, the history by node is that run's, its live status saying which run of the sweep it is; node 7
    trains none; once the run ends node 6 trains none either."""
    import folder_paths
    from klein_lora_lab.nodes.comfy import live_panel, routes

    monkeypatch.setattr(live_panel, "broadcast", lambda event, data: None)
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    sweep = {"name": "lr", "index": 1, "total": 3, "knob": "learning_rate", "value": "5e-05"}
    sweep["text"] = "run 2 of 3: learning_rate 5e-05"
    none = {"run": "", "exists": False, "live": None}
    try:
        with live_panel.LivePanel("lr-learning_rate-5e-05", "6", 10, 0, tmp_path / "run", sweep=sweep):
            data = routes.node_history("6")
            assert data["run"] == "lr-learning_rate-5e-05"
            assert data["live"]["sweep"] == sweep and data["live"]["node"] == "6"
            assert routes.node_history("7") == none
        assert routes.node_history("6") == none
    finally:
        folder_paths.set_output_directory(previous)


def test_history_route_by_node(comfy_server):
    """Through the server, the history by node answers with no run when the node trains none (the panel then shows
    'not started'), and a run name still wins over a node."""
    assert comfy_server.get_json("/klein_lab/train/history?node=424242") == {"run": "", "exists": False, "live": None}
    assert comfy_server.get_json("/klein_lab/train/history?node=424242&run=no_such_run")["run"] == "no_such_run"


def test_encoding_events_are_throttled_and_end_at_n(comfy_root, monkeypatch):
    """The Encode Dataset node's progress sends 'encoding' phase events for its node at most once per 0.1 s of a
    (controlled) clock, always the first entry and the last one (N/N), with done/total, and no run name."""
    from klein_lora_lab.nodes.comfy import encoders

    sent: list[tuple[str, dict]] = []
    clock = [100.0]
    monkeypatch.setattr(encoders, "broadcast", lambda event, data: sent.append((event, data)))
    monkeypatch.setattr(encoders.time, "perf_counter", lambda: clock[0])
    update = encoders.counter_progress("12")
    for done in range(1, 101):  # 100 entries, 0.025 s apart: 2.5 s in all
        update(done, 100)
        clock[0] += 0.025
    assert {e for e, _ in sent} == {"klein_lab.train.phase"}
    assert all(d["phase"] == "encoding" and d["node"] == "12" and d["run"] == "" and d["total"] == 100 for _, d in sent)
    done = [d["done"] for _, d in sent]
    assert done[0] == 1 and done[-1] == 100 and done == sorted(done)
    assert all(b - a >= 4 for a, b in zip(done[:-2], done[1:-1], strict=True))  # 4 entries = 0.1 s apart
    assert len(done) <= 2.5 / encoders.ENCODE_EVENT_INTERVAL_S + 2


def test_blocks_route_serves_the_variant_maps(comfy_server):
    """The block editor's map before a run: GET /klein_lab/blocks gives the 4B and 9B layouts of variants.py."""
    from klein_lora_lab.trainer_core.model.variants import variant_layouts

    assert comfy_server.get_json("/api/klein_lab/blocks") == json.loads(json.dumps(variant_layouts()))


def test_unknown_route_body_is_refused(comfy_server):
    """A body that is not JSON gets a 400 naming what to send."""
    req = urllib.request.Request(comfy_server.url + "/klein_lab/train/stop", data=b"not json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "JSON body" in json.loads(err.value.read())["error"]
    with pytest.raises(ServerError):
        comfy_server.post_json("/klein_lab/train/sample", {"run": "not_running"})


@pytest.fixture(scope="module")
def loaded_model(comfy_root, tiny_model_file, tmp_path_factory):
    """The tiny Klein loaded in-process by ComfyUI's UNETLoader, with a temporary output folder."""
    import folder_paths

    import nodes

    out = tmp_path_factory.mktemp("panel_output")
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("diffusion_models", str(tiny_model_file.parent))
    (model,) = nodes.UNETLoader().load_unet(tiny_model_file.name, "default")
    yield model
    folder_paths.set_output_directory(previous)


@pytest.mark.parametrize(("stop_after", "stop_step"), [(0, 4), (1, 5)])
def test_auto_stop_at_the_sweet_spot(loaded_model, monkeypatch, stop_after, stop_step):
    """A real training run through the glue whose validation renders are the constructed ones (the bicycle prompt
    collapses onto the album at step 4): the clinic marks step 4 with the memorisation rule, stop_at_sweet_spot
    stops the run `stop_after` validations later as a success, every checkpoint is kept, and the text names the
    rule and the checkpoint the Sweet Spot node picks from the same records."""
    from harness.clinic import PROMPTS, TRIGGER, album_latents, base_latents, validation_latents
    from harness.runs import tiny_run_latent
    from klein_lora_lab.nodes.comfy import training
    from klein_lora_lab.nodes.comfy.live_panel import ClinicSetup
    from klein_lora_lab.nodes.comfy.paths import register_runs_folder
    from klein_lora_lab.trainer_core.analysis.live_clinic import find_mark, read_clinic
    from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step
    from klein_lora_lab.trainer_core.training.data import TrainItem
    from klein_lora_lab.trainer_core.training.settings import TrainSettings

    last = 10
    calls = []

    def constructed_render(self, lora):
        """The base renders for the reference (lora None), else the constructed LoRA renders of this step."""
        if lora is None:
            return base_latents()
        calls.append(1)
        return validation_latents(len(calls), 4, last)

    monkeypatch.setattr(training.ComfyCallbacks, "_render", constructed_render)
    settings = TrainSettings(
        rank=4, alpha=4.0, learning_rate=1e-3, steps=last, checkpoint_every=1, sample_every=1, compile_blocks="off"
    )
    root = register_runs_folder()
    run = RunFolder.create(root / f"panel_autostop_{stop_after}", settings, {"trigger": TRIGGER})
    context = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    items = [TrainItem(tiny_run_latent(), context, name="tiny")]
    samples = training.SampleConfig((context,) * 3, None, (4, 4), (), 1, 1.0, 0)
    clinic = ClinicSetup(PROMPTS, TRIGGER, tuple(album_latents()), stop_after)
    with torch.inference_mode():
        outcome = training.train_in_comfy(loaded_model, items, settings, run, False, None, samples, None, None, clinic)
    assert outcome.status == "sweet_spot" and not outcome.interrupted
    assert outcome.result.steps_done == stop_step
    assert [checkpoint_step(p) for p in run.checkpoints()] == list(range(1, stop_step + 1))
    records = read_clinic(run.path)
    assert [r["step"] for r in records] == list(range(1, stop_step + 1))
    mark = find_mark(records)
    assert mark.step == 4 and mark.rule == "memorised"
    keep = f"{run.path.name}/checkpoints/step_{mark.keep_step:06d}.safetensors"
    assert "Marked at step 4" in outcome.message and "bicycle prompts" in outcome.message
    assert f"Keep: {keep}" in outcome.message and "Every checkpoint is kept" in outcome.message
    assert json.loads((run.path / "run.json").read_text())["meta"]["status"] == "sweet_spot"
    assert (run.path / "samples" / "step_000000_prompt1.png").is_file()  # the base row of the gallery
