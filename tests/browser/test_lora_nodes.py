"""The LoRA nodes in the real ComfyUI frontend, classic canvas and Vue nodes (tests/browser/lora_nodes.mjs).

The block-weight editor (js/block_editor.js) on Klein LoRA Loader (blocks): sliders per block coloured by the
course's four groups, preset buttons and a slider writing the block_vector text (the source of truth), the 4B / 9B
map chosen from the vector's length before a run, the tiny model's map and what was loaded after a run. The Klein
LoRA Mixer's per-LoRA toggle: switching one LoRA off changes the queued prompt and what the node applies.
Screenshots go to test-artifacts/browser/ (with KLEIN_LAB_UPDATE_DOCS_IMAGES=1 also to docs/images/).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
from harness.browser import ARTIFACTS, run_driver
from harness.comfy_env import PACK_ROOT
from harness.server import TINY_MODEL_NAME
from harness.workflow_prompt import TINY_BLOCKS

MODES = ("classic", "vue")
RUN = "blocks_editor_run"
GROUPS = ("binding", "texture", "identity", "composition")
DOCS_IMAGES = {
    "block-editor-4b-classic.png": "block-editor.png",
    "block-editor-vue.png": "block-editor-loaded.png",
    "mixer-row-blocks-classic.png": "mixer-rows.png",
}


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory) -> dict[str, Any]:
    from harness.runs import make_tiny_run

    runs = comfy_server.base_dir / "output" / "klein_lora_lab" / "runs"
    if not (runs / RUN).is_dir():
        make_tiny_run(runs, RUN, (1, 2))
    config = tmp_path_factory.mktemp("loras") / "config.json"
    config.write_text(json.dumps({"model": TINY_MODEL_NAME, "run": RUN, "timeoutMs": 120_000}))
    os.environ["KLEIN_LAB_LORAS_CONFIG"] = str(config)
    try:
        result = run_driver("lora_nodes.mjs", comfy_server.url, timeout_s=900)
    finally:
        del os.environ["KLEIN_LAB_LORAS_CONFIG"]
    if os.environ.get("KLEIN_LAB_UPDATE_DOCS_IMAGES") == "1":
        for src, dst in DOCS_IMAGES.items():
            shutil.copyfile(ARTIFACTS / src, PACK_ROOT / "docs" / "images" / dst)
    return result


def _vector(text: str) -> list[float]:
    return [float(v) for v in text.replace(",", " ").split()]


def test_no_page_errors_from_the_pack(page) -> None:
    """Neither renderer logs a page error that mentions the pack while the editor and the mixer are used."""
    assert [e for e in page["pageErrors"] if "klein" in e.lower() or "block_editor" in e] == []


@pytest.mark.parametrize("mode", MODES)
def test_editor_shows_the_4b_map_before_a_run(page, mode: str) -> None:
    """The editor starts closed (one line: the node keeps its size in saved workflows); opened, before any run and
    with an empty vector, it shows Klein 4B's 25 blocks, double blocks first, in the course's four groups with
    four colours, at what preset 'all' applies (1 everywhere)."""
    closed = page["modes"][mode]["editor"]["closed"]
    assert closed["open"] == "false" and closed["visibleSliders"] == 0 and closed["height"] < 40
    before = page["modes"][mode]["editor"]["before"]
    assert before["visible"] and before["inVueNode"] is (mode == "vue")
    assert before["count"] == 25 and before["layout"] == "klein-4b"
    assert before["blocks"][:5] == [f"double_blocks.{i}" for i in range(5)] and before["blocks"][5] == "single_blocks.0"
    assert before["groups"] == ["binding"] * 5 + ["texture"] * 6 + ["identity"] * 8 + ["composition"] * 6
    assert len(before["colours"]) == 4
    assert before["values"] == [1.0] * 25 and before["vectorWidget"] == "" and before["presetWidget"] == "all"


@pytest.mark.parametrize("mode", MODES)
def test_preset_button_writes_the_vector_text(page, mode: str) -> None:
    """The 'identity' button writes a 25-value vector (1 on single blocks 6–13, 0 elsewhere) into block_vector,
    sets preset 'custom', and the queued prompt carries exactly that text."""
    identity = page["modes"][mode]["editor"]["identity"]
    expected = [0.0] * 11 + [1.0] * 8 + [0.0] * 6
    assert _vector(identity["vectorWidget"]) == expected and identity["values"] == expected
    assert identity["presetWidget"] == "custom"
    shaped = page["modes"][mode]["editor"]["shaped"]
    assert shaped["count"] == 25 and shaped["values"][5] == 0.2 and shaped["values"][-1] == 0.2
    prompt = page["modes"][mode]["editor"]["identityPrompt"]
    assert prompt["preset"] == "custom" and _vector(prompt["block_vector"]) == expected


@pytest.mark.parametrize("mode", MODES)
def test_typed_vector_redraws_the_sliders(page, mode: str) -> None:
    """A 32-value vector typed into the text widget redraws the editor as Klein 9B (8 double + 24 single) with
    the typed values; 'reset' clears the text back to preset 'all'."""
    editor = page["modes"][mode]["editor"]
    nine = editor["nine"]
    assert nine["count"] == 32 and nine["layout"] == "klein-9b" and nine["warning"] == ""
    assert nine["values"] == [0.5 if i % 2 else 1.0 for i in range(32)]
    assert nine["groups"].count("binding") == 8
    assert editor["reset"]["vectorWidget"] == "" and editor["reset"]["presetWidget"] == "all"


@pytest.mark.parametrize("mode", MODES)
def test_run_shows_what_was_loaded_and_the_models_blocks(page, mode: str) -> None:
    """After a run on the tiny model the editor uses the model's own block count (2 double + 6 single) and shows
    the LoRA's modules, blocks and format on the node, as sent in the node's ui output."""
    editor = page["modes"][mode]["editor"]
    run = editor["run1"]
    assert run["ok"], run["error"]
    (sent,) = run["output"]["klein_blocks"]
    assert sent["layout"]["double"] == TINY_BLOCKS[0] and sent["layout"]["single"] == TINY_BLOCKS[1]
    (lora,) = sent["loaded"]
    assert editor["loadedShown"], "the editor did not show what the run loaded"
    after = editor["afterRun"]
    assert after["count"] == sum(TINY_BLOCKS) and after["layout"] == "this model (last run)"
    assert after["loaded"]["modules"] == lora["modules"] > 0
    assert after["loaded"]["blocks"] == len(lora["blocks"]) == sum(TINY_BLOCKS)  # our runs train every block
    assert after["loaded"]["format"] == lora["format"] != ""
    assert f"{lora['modules']} modules" in after["loaded"]["text"] and lora["format"] in after["loaded"]["text"]


@pytest.mark.parametrize("mode", MODES)
def test_slider_and_custom_vector_run(page, mode: str) -> None:
    """On the tiny model's map, 'texture' then four ArrowDown presses on the first texture slider give that block
    0.8 in the text (the others as the preset wrote them); choosing another preset in the combo clears the vector;
    the texture vector then runs, accepted by the node (preset custom in its report)."""
    editor = page["modes"][mode]["editor"]
    texture = [0.0] * TINY_BLOCKS[0] + [1.0 if g == "texture" else 0.0 for g in editor["slid"]["groups"][2:]]
    slid = _vector(editor["slid"]["vectorWidget"])
    first = TINY_BLOCKS[0]  # single_blocks.0, the first texture block
    assert len(slid) == sum(TINY_BLOCKS) and slid[first] == pytest.approx(0.8)
    assert slid[:first] + slid[first + 1 :] == texture[:first] + texture[first + 1 :]
    assert editor["slid"]["presetWidget"] == "custom"
    assert editor["presetCombo"]["vectorWidget"] == "" and editor["presetCombo"]["presetWidget"] == "identity"
    run = editor["run2"]
    assert run["ok"], run["error"]
    assert "[custom]" in run["output"]["text"][0]
    assert _vector(editor["final"]["vectorWidget"]) == texture
    assert (ARTIFACTS / f"block-editor-{mode}.png").stat().st_size > 0


@pytest.mark.parametrize("mode", MODES)
def test_mixer_toggle_leaves_one_lora_out(page, mode: str) -> None:
    """Two LoRAs in the mixer both apply; switching slot 2 off puts on_2=false in the queued prompt (file and
    scale kept) and the node then applies only slot 1."""
    mixer = page["modes"][mode]["mixer"]
    first, second = mixer["loras"][:2]
    assert mixer["bothPrompt"]["on_2"] is True and mixer["offPrompt"]["on_2"] is False
    assert mixer["offPrompt"]["lora_2"] == second and mixer["offPrompt"]["scale_2"] == 0.5
    assert mixer["both"]["ok"] and mixer["off"]["ok"], (mixer["both"]["error"], mixer["off"]["error"])
    both = mixer["both"]["output"]["text"][0].splitlines()
    off = mixer["off"]["output"]["text"][0].splitlines()
    assert len(both) == 2 and both[0].startswith(first) and both[1].startswith(f"{second} @ 0.5")
    assert off == both[:1]


@pytest.mark.parametrize("mode", MODES)
def test_mixer_add_lora_rows(page, mode: str) -> None:
    """'+ Add LoRA' adds rows past the four slots, edited in their own fields (file, scale typed, on/off): the rows
    travel in the prompt's more_loras text and apply after the slots; a row switched off is left out (kept in the
    text), and × removes a row."""
    mixer = page["modes"][mode]["mixer"]
    first, second = mixer["loras"][:2]
    assert mixer["rowsBefore"] == 0 and mixer["rowsCount"] == 2
    rows = json.loads(mixer["rowsPrompt"]["more_loras"])
    assert rows == [
        {"on": True, "lora": first, "scale": 0.25, "preset": "all"},
        {"on": True, "lora": second, "scale": 1, "preset": "all"},
    ]
    assert mixer["rowsRun"]["ok"], mixer["rowsRun"]["error"]
    lines = mixer["rowsRun"]["output"]["text"][0].splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"{first} @ 1", f"{first} @ 0.25", f"{second} @ 1"]
    off = json.loads(mixer["rowOffPrompt"]["more_loras"])
    assert off[0]["on"] is False and off[1]["on"] is True
    assert mixer["rowOffRun"]["ok"], mixer["rowOffRun"]["error"]
    lines = mixer["rowOffRun"]["output"]["text"][0].splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"{first} @ 1", f"{second} @ 1"]
    assert json.loads(mixer["removedPrompt"]["more_loras"]) == off[:1]


@pytest.mark.parametrize("mode", MODES)
def test_mixer_row_block_editor(page, mode: str) -> None:
    """A row's ▦ opens its own block editor on the model's map (learned from the mixer's last run); its 'texture'
    button writes the row's blocks and sets the row's preset to custom; the mix then runs with that row's blocks."""
    mixer = page["modes"][mode]["mixer"]
    first = mixer["loras"][0]
    editor = mixer["rowEditor"]
    texture = [1.0 if g == "texture" else 0.0 for g in editor["groups"]]
    assert editor["count"] == sum(TINY_BLOCKS) and editor["layout"] == "this model (last run)"
    assert editor["values"] == texture and editor["rowPreset"] == "custom"
    (row,) = json.loads(mixer["rowBlocksPrompt"]["more_loras"])
    assert row["on"] is True and row["lora"] == first and row["preset"] == "custom"
    assert _vector(row["blocks"]) == texture
    run = mixer["rowBlocksRun"]
    assert run["ok"], run["error"]
    lines = run["output"]["text"][0].splitlines()
    assert lines[-1].startswith(f"{first} @ 0.25 [custom]")
