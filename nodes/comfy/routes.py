"""The training panel's HTTP routes on ComfyUI's server, registered once when the pack loads.

  GET  /klein_lab/train/history?run=NAME  the run's history read from its folder (metrics, checkpoints, samples,
                                          clinic, mark) plus the live status while it trains; read-only
  GET  /klein_lab/train/history?node=ID   the same for the run node ID trains now (a Sweep node's panel after a
                                          reload: its runs change); {"run": ""} when it trains none
  POST /klein_lab/train/stop    {run}     Stop & keep: the run stops after its current step, the prompt succeeds
  POST /klein_lab/train/sample  {run}     Sample now: validation previews after the current step
  GET  /klein_lab/train/presets           the course's presets (the panel fills rank/alpha/lr/steps from them)
  GET  /klein_lab/blocks                  the block layout (names, the course's four groups) of every registered
                                          Klein variant: the block-weight editor's map before the node has run

Run names go through `run_names.run_path`, the Train node's own rule: nothing outside the runs folder is read.
Images are not served here: the history names sample files that ComfyUI's /view serves from the output folder.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from ...trainer_core.analysis.live_clinic import find_mark, read_clinic
from ...trainer_core.analysis.per_image import latest_learning, learning_summary
from ...trainer_core.model.variants import variant_layouts
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ...trainer_core.training.settings import PRESETS
from .feedback import prompt_server
from .live_panel import live_panel, live_run_of_node, request_sample, request_stop
from .paths import lora_list_name, output_relative
from .run_names import run_path

LOG = logging.getLogger("klein_lora_lab")
PREFIX = "/klein_lab/train"
MAX_POINTS = 5000  # a long run's loss history is thinned to about this many points (validation points all kept)
_SAMPLE_RE = re.compile(r"^step_(\d+)_prompt(\d+)\.png$")
_registered = False


def register_routes() -> bool:
    """Add the routes to ComfyUI's PromptServer (once); False when no server runs (in-process use, tests)."""
    global _registered
    server = prompt_server()
    if server is None or _registered:
        return _registered
    routes = server.routes
    routes.get(f"{PREFIX}/history")(history)
    routes.post(f"{PREFIX}/stop")(stop)
    routes.post(f"{PREFIX}/sample")(sample_now)
    routes.get(f"{PREFIX}/presets")(presets)
    routes.get("/klein_lab/blocks")(blocks)
    _registered = True
    return True


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _thin(points: list[list[Any]]) -> list[list[Any]]:
    if len(points) <= MAX_POINTS:
        return points
    every = -(-len(points) // MAX_POINTS)
    return [p for i, p in enumerate(points) if i % every == 0 or p[2] is not None or i == len(points) - 1]


def run_history(path: Path) -> dict[str, Any]:
    """Everything the panel draws for the run in `path`, read from its folder (and the live status)."""
    name = path.name
    live = live_panel(name)
    if not (path / "run.json").is_file():
        return {"run": name, "exists": False, "live": live.snapshot() if live else None}
    run = RunFolder.open(path)
    metrics = run.read_metrics()
    by_step: dict[int, list[Any]] = {}
    for r in metrics:
        if isinstance(r.get("step"), int) and "loss" in r:
            by_step[r["step"]] = [r["step"], r["loss"], r.get("val_loss")]
    prompts = list(run.meta.get("validation_prompts", []))
    samples = []
    if run.samples_dir.is_dir():
        for file in sorted(run.samples_dir.iterdir()):
            m = _SAMPLE_RE.match(file.name)
            if m and file.is_file() and not file.is_symlink():
                subfolder, filename = output_relative(file)
                i = int(m.group(2))
                text = prompts[i] if i < len(prompts) else f"prompt {i}"
                ref = {"filename": filename, "subfolder": subfolder, "type": "output"}
                samples.append({"step": int(m.group(1)), "prompt": i, "text": text, "image": ref})
    clinic = read_clinic(path)
    mark = find_mark(clinic, metrics)
    s = run.settings
    return {
        "run": name,
        "exists": True,
        "status": run.meta.get("status", ""),
        "trigger": run.meta.get("trigger", ""),
        "prompts": prompts,
        "settings": {k: getattr(s, k) for k in ("rank", "alpha", "learning_rate", "steps", "sample_every")},
        "total": s.steps,
        "points": _thin([by_step[k] for k in sorted(by_step)]),
        "checkpoints": [{"step": checkpoint_step(p), "lora": lora_list_name(p)} for p in run.checkpoints()],
        "samples": samples,
        "clinic": clinic,
        "mark": mark.to_dict() if mark else None,
        "per_image": learning_summary(latest_learning(run.read_per_image())),
        "live": live.snapshot() if live else None,
    }


def _run_of(name: object) -> Path:
    if not isinstance(name, str):
        raise ValueError(f"run must be text, got {type(name).__name__}: send the run name.")
    return run_path(name)


def node_history(node_id: str) -> dict[str, Any]:
    """The history of the run node `node_id` trains now; {"run": "", "exists": False, "live": None} when none."""
    name = live_run_of_node(node_id)
    if name is None:
        return {"run": "", "exists": False, "live": None}
    return run_history(run_path(name))


async def history(request: web.Request) -> web.Response:
    if "node" in request.query and "run" not in request.query:
        try:
            return web.json_response(await asyncio.to_thread(node_history, request.query["node"]))
        except (OSError, ValueError) as err:  # as below: a damaged run folder is named, the server stays up
            return _error(f"cannot read the run of node {request.query['node']!r}: {err}", 422)
    try:
        path = _run_of(request.query.get("run", ""))
    except ValueError as err:
        return _error(str(err), 400)
    try:
        data = await asyncio.to_thread(run_history, path)
    except (OSError, ValueError) as err:  # a damaged run.json or metrics file: say which, keep the server up
        return _error(f"cannot read run '{path.name}': {err}", 422)
    return web.json_response(data)


async def _control(request: web.Request, action) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error("send a JSON body {run: <run name>}.", 400)
    try:
        path = _run_of(body.get("run") if isinstance(body, dict) else None)
    except ValueError as err:
        return _error(str(err), 400)
    panel = action(path.name)
    if panel is None:
        return _error(f"run '{path.name}' is not training now.", 409)
    return web.json_response({"run": path.name, "step": panel.step})


async def stop(request: web.Request) -> web.Response:
    return await _control(request, request_stop)


async def sample_now(request: web.Request) -> web.Response:
    return await _control(request, request_sample)


async def presets(_request: web.Request) -> web.Response:
    return web.json_response(PRESETS)


async def blocks(_request: web.Request) -> web.Response:
    return web.json_response(variant_layouts())
