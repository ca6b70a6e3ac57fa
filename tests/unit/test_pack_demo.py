"""The demo without ComfyUI: it says how to get one and exits non-zero instead of pretending."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from harness.comfy_env import PACK_ROOT


@pytest.mark.skipif(PACK_ROOT.parent.name == "custom_nodes", reason="the pack sits inside a ComfyUI checkout")
def test_demo_without_comfyui_explains_and_fails(tmp_path) -> None:
    """No COMFYUI_PATH and no surrounding ComfyUI: exit status 2, a message naming COMFYUI_PATH, no output written."""
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    out = tmp_path / "demo-output"
    proc = subprocess.run(
        [sys.executable, str(PACK_ROOT / "scripts" / "demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "COMFYUI_PATH" in proc.stderr and "scripts/demo.sh" in proc.stderr
    assert not out.exists()
