"""The real ComfyUI frontend, in Chromium, loads the pack's extension and can place the pack's nodes.

One browser run (tests/browser/drive.mjs) covers the classic LiteGraph canvas and Vue nodes
(`Comfy.VueNodes.Enabled=true`); screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import pytest
from harness.browser import ARTIFACTS, run_driver

EXTENSION = "KleinLoraLab.core"


@pytest.fixture(scope="module")
def frontend(comfy_server) -> dict:
    return run_driver("drive.mjs", comfy_server.url)


def test_extension_registered_once_without_errors(frontend) -> None:
    """Our js extension is registered exactly once and the page logs no error that mentions the pack."""
    assert frontend["extensions"].count(EXTENSION) == 1
    ours = [e for e in frontend["pageErrors"] if "klein" in e.lower()]
    assert ours == []


@pytest.mark.parametrize("mode", ["classic", "vue"])
def test_model_info_node_can_be_added(frontend, mode: str) -> None:
    """LiteGraph.createNode builds KleinLabModelInfo from /object_info (MODEL in, STRING out) in both renderers."""
    node = frontend["modes"][mode]
    assert node["created"] and node["type"] == "KleinLabModelInfo" and node["added"] == 1
    assert node["inputs"] == ["MODEL"] and node["outputs"] == ["STRING"]
    assert node["vueNodesSetting"] is (mode == "vue")
    if mode == "vue":
        assert "Klein Model Info" in (node["domNodeText"] or "")  # rendered as a Vue DOM node
    assert (ARTIFACTS / f"frontend-{mode}.png").stat().st_size > 0
