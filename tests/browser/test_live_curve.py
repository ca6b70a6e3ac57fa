"""A run followed live in the real ComfyUI frontend, classic canvas and Vue nodes (tests/browser/live_curve.mjs).

The Loss Curve node (js/loss_curve_live.js) draws the run named in its `run` widget while that run trains, from
the history route and the `klein_lab.train.*` events, instead of keeping the previous picture until the run ends.
The Encode Dataset node sends phase events while it encodes the album ('encoding i/N', at most 10 a second) and the
training panel of the Train node it feeds shows them. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from harness.browser import run_driver
from harness.comfy_env import PACK_ROOT
from harness.server import TINY_MODEL_NAME, VAE_NAME
from harness.workflow_prompt import make_album

MODES = ("classic", "vue")
WORKFLOW = PACK_ROOT / "workflows" / "Klein 01 - Train a style LoRA.json"


@pytest.fixture(scope="module")
def live(comfy_server, tmp_path_factory) -> dict[str, Any]:
    albums = {
        mode: str(make_album(comfy_server.base_dir / "input" / f"live_album_{mode}", label=mode, tint=97 + i))
        for i, mode in enumerate(MODES)
    }
    widgets = {
        "UNETLoader": {"unet_name": TINY_MODEL_NAME},
        "VAELoader": {"vae_name": VAE_NAME},
        "KleinLabDatasetFolder": {"resolution": 32, "trigger": "TOK"},
        "KleinLabTrainLora": {
            "steps": 400,  # far more than the test waits for: the run is stopped from the panel
            "rank": 4,
            "checkpoint_every": 5,
            "sample_every": 1000,
            "sample_steps": 2,
            "sample_cfg": 1.0,
            "learning_rate": 1e-3,
        },
    }
    config = {
        "workflow": json.loads(WORKFLOW.read_text()),
        "albums": albums,
        "runs": {mode: f"live_curve_{mode}" for mode in MODES},
        "widgets": widgets,
        "timeoutMs": 400_000,
    }
    path = tmp_path_factory.mktemp("live") / "config.json"
    path.write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLEIN_LAB_LIVE_CONFIG", str(path))
        return run_driver("live_curve.mjs", comfy_server.url, timeout_s=1500)


def test_extensions_registered_once_without_errors(live) -> None:
    """The live curve extension registers once; nothing the page logs as an error mentions the pack (the
    frontend's probes of the Klein loaders' download links, refused by the page's security policy, are not ours)."""
    assert live["extensions"].count("KleinLoraLab.lossCurveLive") == 1
    errors = [e for e in live["pageErrors"] if "Content Security Policy" not in e]
    assert [e for e in errors if "klein" in e.lower() or "curve" in e.lower()] == []


@pytest.mark.parametrize("mode", MODES)
def test_loss_curve_follows_the_run_live(live, mode: str) -> None:
    """Hidden before the run, the Loss Curve node's live chart appears while its run trains (inside the Vue node
    with Vue nodes on), its point count and step grow with the run, and after Stop & keep it shows the run's
    final status and every point."""
    r = live["modes"][mode]
    run = f"live_curve_{mode}"
    assert r["before"] is not None and not r["before"]["visible"]
    early, later, stopped = r["early"], r["later"], r["stopped"]
    assert early["visible"] and early["inVueNode"] is (mode == "vue")
    assert early["run"] == run and early["status"] == "running" and early["text"].startswith("live")
    assert later["points"] >= early["points"] + 5 and later["step"] > early["step"]
    assert later["chartPoints"] == later["points"]  # every point is drawn
    assert stopped["status"] == "stopped" and stopped["points"] >= later["points"]
    assert stopped["step"] == stopped["points"]  # one point per step, none missed between events


@pytest.mark.parametrize("mode", MODES)
def test_encoding_phase_reported_in_the_panel(live, mode: str) -> None:
    """The Encode Dataset node sends 'encoding' phase events with i/N for its own node id, ending at N/N; the
    Train node's panel shows 'encoding i/N' before the run's own phases. (The throttle, at most one event per
    0.1 s, is checked with a controlled clock in tests/comfy/test_train_panel_comfy.py.)"""
    r = live["modes"][mode]
    events = r["encoding"]
    assert events, "no encoding event reached the page"
    assert {e["node"] for e in events} == {r["ids"]["encode"]} and {e["run"] for e in events} == {""}
    total = events[-1]["total"]
    assert total >= 3 and events[-1]["done"] == total
    assert [e["done"] for e in events] == sorted(e["done"] for e in events)
    shown = [s for s in r["statuses"] if re.search(r"phase encoding \d+/\d+", s)]
    assert shown and shown[-1].endswith(f"phase encoding {total}/{total}")
    first_training = next(i for i, s in enumerate(r["statuses"]) if "step " in s)
    assert r["statuses"].index(shown[0]) < first_training
