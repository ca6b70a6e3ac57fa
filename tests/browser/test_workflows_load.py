"""Every shipped workflow loads in the real ComfyUI frontend, and the API prompt it queues is the converter's.

tests/browser/workflows.mjs fetches the workflows the server serves as this pack's templates (so a file that
ComfyUI does not serve fails here), loads each with `app.loadGraphData` in the classic canvas and with Vue
nodes, and reports node types the frontend does not know, links that do not match their slots (ids listed on
both ends, types compatible), and the prompt `app.graphToPrompt()` builds. That prompt must equal what
tests/harness/workflow_prompt.py makes of the same file, which is what makes the comfy tier's run of every
workflow (tests/comfy/test_workflows_run.py) a run of what users queue.

The standard Klein file names the workflows use (models, text encoder, VAE, LoRAs, input images) get listing
stand-ins in the test server's folders while the page loads, so the screenshots show the workflows as a user
with the models sees them; they are removed afterwards. Screenshots: test-artifacts/browser/workflow-*.png (the
guide's images of the workflows come from tests/browser/test_templates.py, opened as an artist opens them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness.browser import ARTIFACTS, run_driver
from harness.comfy_env import PACK_ROOT
from harness.workflow_prompt import is_widget_input, widget_values_by_name, workflow_to_prompt
from PIL import Image

WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
MODES = ("classic", "vue")
# Which models folder a stock loader's file lives in; any other missing .safetensors choice is a LoRA.
STOCK_FOLDERS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _stand_ins(server, stand_in: Path) -> list[Path]:
    """Create a listing stand-in for every file a workflow names that the server does not have; return them."""
    info = server.object_info()
    made: list[Path] = []
    for path in WORKFLOWS:
        for node in _load(path)["nodes"]:
            spec = info.get(node["type"])
            if spec is None:
                continue
            entries = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
            for name, value in widget_values_by_name(node, spec).items():
                entry = entries[name] if len(entries[name]) > 1 else [entries[name][0], {}]
                if not is_widget_input(entry) or not isinstance(value, str):
                    continue
                options = entry[1] or {}
                choices = entry[0] if isinstance(entry[0], list) else options.get("options", [])
                if options.get("image_upload"):
                    target = server.base_dir / "input" / value
                elif value.endswith(".safetensors") and value not in choices:
                    folder = STOCK_FOLDERS.get((node["type"], name), "loras")
                    target = server.base_dir / "models" / folder / value
                else:
                    continue
                if target.exists() or target.is_symlink():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if options.get("image_upload"):
                    Image.new("RGB", (64, 64), (30, 120, 200)).save(target)
                else:
                    target.symlink_to(stand_in)
                made.append(target)
    return made


@pytest.fixture(scope="module")
def loaded(comfy_server, tiny_model_file) -> dict[str, Any]:
    made = _stand_ins(comfy_server, tiny_model_file)
    try:
        result = run_driver("workflows.mjs", comfy_server.url, timeout_s=900)
    finally:
        for path in made:
            path.unlink()
    return result


def test_the_server_serves_every_shipped_workflow_as_a_template(loaded) -> None:
    """ComfyUI lists exactly the files in workflows/ as this pack's templates (what users open from the menu)."""
    assert sorted(loaded["templates"]) == [p.stem for p in WORKFLOWS]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_loads_without_missing_nodes_or_bad_links(loaded, path: Path, mode: str) -> None:
    """Loaded in the frontend, the workflow has every node and link of the file, no node type the frontend
    lacks, no link whose ends disagree or whose types do not connect; with Vue nodes every node is rendered."""
    report = loaded["modes"][mode][path.stem]
    saved = _load(path)
    assert report["missingTypes"] == []
    assert report["badLinks"] == []
    assert report["nodeCount"] == len(saved["nodes"])
    assert report["linkCount"] == len(saved["links"])
    if mode == "vue":
        assert report["domNodes"] == report["nodeCount"]
    assert (ARTIFACTS / f"workflow-{path.stem}-{mode}.png").stat().st_size > 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_converter_matches_the_frontends_graph_to_prompt(loaded, comfy_server, path: Path) -> None:
    """For each workflow the harness converter gives the prompt the frontend's own graphToPrompt gives: the same
    node ids and types, the same inputs with the same values and links, in both renderers."""
    ours = workflow_to_prompt(_load(path), comfy_server.object_info())
    expected = {nid: (n["class_type"], n["inputs"]) for nid, n in ours.items()}
    for mode in MODES:
        theirs = loaded["modes"][mode][path.stem]["prompt"]
        assert {nid: (n["class_type"], n["inputs"]) for nid, n in theirs.items()} == expected, mode


def test_no_page_error_mentions_the_pack(loaded) -> None:
    """Loading all workflows in both renderers logs no page error that mentions the pack or its nodes."""
    ours = [e for e in loaded["pageErrors"] if "klein" in e.lower()]
    assert ours == []
