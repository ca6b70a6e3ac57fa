"""Runs the playwright-core driver scripts in tests/browser/ (Node) against a test ComfyServer."""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import Any

from .comfy_env import PACK_ROOT

BROWSER_DIR = PACK_ROOT / "tests" / "browser"
ARTIFACTS = PACK_ROOT / "test-artifacts" / "browser"


def run_driver(script: str, url: str, timeout_s: float = 240) -> dict[str, Any]:
    """Run `node tests/browser/<script> <url> <fresh profile> <artifacts>`; return the JSON it prints last."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="klein-lab-chromium-") as profile:
        proc = subprocess.run(
            ["node", str(BROWSER_DIR / script), url, profile, str(ARTIFACTS)],
            cwd=BROWSER_DIR,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
