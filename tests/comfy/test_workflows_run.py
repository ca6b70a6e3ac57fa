"""Every shipped workflow (workflows/*.json) runs to completion on the CPU test server with the tiny model.

Each workflow is converted to an API prompt the way the frontend queues it (harness.workflow_prompt, itself
checked against the real frontend in the browser tier), swapped onto the tiny Klein / random VAE / fake CLIP
with small sizes and step counts, and queued through /prompt. The test asserts the run succeeded, every output
node produced output, every file an output names exists, and training nodes wrote their checkpoints.
Workflows that load LoRAs or read a run get the checkpoints of a run that the shipped style-training workflow
made first; that run is also the style-training workflow's own case (queued once, not twice). Each workflow's
run time is printed (the closing note of issue #8 lists them).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness.comfy_env import PACK_ROOT
from harness.workflow_prompt import TinySwap, output_node_ids, swap_for_tiny, workflow_to_prompt

WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
TRAIN_NODE = "KleinLabTrainLora"
SOURCE_WORKFLOW = "Klein 01 - Train a style LoRA.json"  # makes the run that LoRA-loading workflows use
RUN_TIMEOUT_S = 900


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _tiny_prompt(server, path: Path, available: list[str], tag: str) -> tuple[TinySwap, dict[str, str]]:
    """The workflow converted and swapped; training nodes get a fresh run name (returned by node id)."""
    info = server.object_info()
    prompt = workflow_to_prompt(_load(path), info)
    run_names = {
        nid: f"{tag}_{nid}_{uuid.uuid4().hex[:6]}" for nid, n in prompt.items() if n["class_type"] == TRAIN_NODE
    }
    swap = swap_for_tiny(prompt, info, input_dir=server.base_dir / "input", run_names=run_names, available=available)
    return swap, run_names


def _runs_dir(server) -> Path:
    return server.base_dir / "output" / "klein_lora_lab" / "runs"


@dataclass(frozen=True)
class WorkflowRun:
    """One workflow queued on the tiny server: what was queued, the run name per training node, the outputs."""

    swap: TinySwap
    run_names: dict[str, str]
    outputs: dict[str, Any]
    seconds: float


def _queue(server, swap: TinySwap, run_names: dict[str, str]) -> WorkflowRun:
    start = time.perf_counter()
    outputs = server.run_prompt(swap.prompt, timeout_s=RUN_TIMEOUT_S)
    return WorkflowRun(swap, run_names, outputs, time.perf_counter() - start)


@pytest.fixture(scope="module")
def source_run(comfy_server) -> WorkflowRun:
    """The shipped style-training workflow, run once: it is both that workflow's own test case and the source
    of the checkpoints the LoRA-loading workflows use (training it twice would check nothing more)."""
    swap, run_names = _tiny_prompt(comfy_server, PACK_ROOT / "workflows" / SOURCE_WORKFLOW, [], "source")
    assert _missing_choices(swap.prompt, comfy_server.object_info()) == [], "a choice the tiny server cannot offer"
    return _queue(comfy_server, swap, run_names)


@pytest.fixture(scope="module")
def lora_source(comfy_server, source_run) -> list[str]:
    """A finished tiny run made by the shipped style-training workflow: its run name, then its checkpoints as
    the loras list shows them (newest first), for combos whose workflow value the server does not have."""
    (run,) = source_run.run_names.values()
    checkpoints = sorted((_runs_dir(comfy_server) / run / "checkpoints").glob("step_??????.safetensors"))
    assert checkpoints, f"the source run {run} wrote no checkpoint"
    return [run, *(f"{run}/checkpoints/{p.name}" for p in reversed(checkpoints))]


def _missing_choices(prompt: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """'node.input = value' for every combo value the server does not offer."""
    missing = []
    for nid, node in prompt.items():
        spec = info[node["class_type"]]["input"]
        entries = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list) or name not in entries:
                continue
            kind, opts = entries[name][0], (entries[name][1] if len(entries[name]) > 1 else {}) or {}
            choices = kind if isinstance(kind, list) else opts.get("options")
            if choices is not None and not opts.get("image_upload") and value not in choices:
                missing.append(f"{nid}.{name} = {value!r}")
    return missing


def _files_named(ui: Any) -> Iterator[dict[str, Any]]:
    """Every {filename, subfolder, type} entry anywhere in a node's UI output (images, scrub frames, grids)."""
    if isinstance(ui, dict):
        if isinstance(ui.get("filename"), str) and "type" in ui:
            yield ui
        for value in ui.values():
            yield from _files_named(value)
    elif isinstance(ui, list):
        for value in ui:
            yield from _files_named(value)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_on_the_tiny_model(comfy_server, request, capsys, path: Path) -> None:
    """The workflow, as the frontend would queue it with the tiny model swapped in, runs to success; each output
    node shows something, each file an output names exists on disk, and each training node's run folder holds
    a checkpoint per step (the swap sets 3 steps, a checkpoint every step), every run of a sweep too."""
    info = comfy_server.object_info()
    if path.name == SOURCE_WORKFLOW:
        done: WorkflowRun = request.getfixturevalue("source_run")  # already queued once for the other cases
    else:
        swap, run_names = _tiny_prompt(comfy_server, path, [], path.stem)
        if _missing_choices(swap.prompt, info):
            swap, run_names = _tiny_prompt(comfy_server, path, request.getfixturevalue("lora_source"), path.stem)
            info = comfy_server.object_info()  # the source run's checkpoints are in the loras list now
        assert _missing_choices(swap.prompt, info) == [], "a choice the tiny server cannot offer"
        done = _queue(comfy_server, swap, run_names)
    with capsys.disabled():
        print(f"\n[workflow] {path.name}: {done.seconds:.1f} s on the tiny model (CPU), {len(done.swap.prompt)} nodes")

    for nid in output_node_ids(done.swap.prompt, info):
        assert done.outputs.get(nid), f"output node {nid} ({done.swap.prompt[nid]['class_type']}) produced nothing"
    for entry in _files_named(done.outputs):
        folder = comfy_server.base_dir / entry["type"] / entry.get("subfolder", "")
        assert (folder / entry["filename"]).is_file(), entry
    sweep_runs = [
        r["name"]
        for n in done.swap.prompt.values()
        if n["class_type"] == "KleinLabSweep"
        for r in json.loads((_runs_dir(comfy_server) / f"{n['inputs']['sweep_name']}.sweep.json").read_text())["runs"]
    ]
    for run in [*done.run_names.values(), *sweep_runs]:
        steps = sorted(p.name for p in (_runs_dir(comfy_server) / run / "checkpoints").glob("step_??????.safetensors"))
        assert steps == [f"step_{s:06d}.safetensors" for s in (1, 2, 3)], (run, steps)


def test_every_workflow_uses_stock_loaders_and_a_note() -> None:
    """Each shipped workflow loads Klein with the stock loaders (UNETLoader always; CLIPLoader type flux2 and
    VAELoader where used) and the standard file names (Klein Base; the distilled Klein in the workflow that uses a
    Base LoRA on it), and carries a note on the canvas saying what to set."""
    expected = {
        "UNETLoader": "flux-2-klein-base-4b.safetensors",
        "CLIPLoader": "qwen_3_4b.safetensors",
        "VAELoader": "flux2-vae.safetensors",
    }
    assert WORKFLOWS, "no workflows/*.json"
    for path in WORKFLOWS:
        nodes = _load(path)["nodes"]
        distilled = "distilled" in path.stem
        for kind, filename in expected.items():
            if kind == "UNETLoader" and distilled:
                filename = "flux-2-klein-4b.safetensors"
            loaders = [n for n in nodes if n["type"] == kind]
            assert all(n["widgets_values"][0] == filename for n in loaders), (path.name, kind)
            assert loaders or kind != "UNETLoader", f"{path.name} loads no diffusion model"
        assert all(n["widgets_values"][1] == "flux2" for n in nodes if n["type"] == "CLIPLoader"), path.name
        notes = [n for n in nodes if n["type"] in ("Note", "MarkdownNote")]
        assert notes and all(n["widgets_values"][0].strip() for n in notes), path.name
