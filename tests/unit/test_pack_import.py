"""Importing the pack is light, and a ComfyUI that cannot host it gets one clear log line instead of a crash.

Each check runs in a fresh interpreter: the pytest process may already hold torch or a real ComfyUI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness.comfy_env import PACK_ROOT

TESTS_DIR = PACK_ROOT / "tests"

# Registers the pack as `klein_lora_lab` exactly as ComfyUI would load a custom node folder.
_PRELUDE = f"""
import asyncio, json, logging, sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from harness.pack import register_pack
"""


def run_fresh(code: str, extra_path: Path | None = None) -> dict:
    """Run `code` in a fresh Python (optionally with `extra_path` first on sys.path); return its JSON print."""
    prelude = _PRELUDE + (f"sys.path.insert(0, {str(extra_path)!r})\n" if extra_path else "")
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=extra_path or PACK_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_pack_imports_no_torch() -> None:
    """`import klein_lora_lab` (the root __init__) loads neither torch nor any ComfyUI module."""
    result = run_fresh(
        """
        register_pack()
        import klein_lora_lab
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "comfy", "comfy_api", "numpy"))
        print(json.dumps({"heavy": heavy, "web": klein_lora_lab.WEB_DIRECTORY}))
        """
    )
    assert result["heavy"] == []
    assert (PACK_ROOT / result["web"] / "klein_lora_lab.js").is_file()


def _fake_comfyui(root: Path, *, v3_api: bool, flux2: bool) -> Path:
    """A stand-in for an older ComfyUI: optionally without comfy_api.latest and/or without Flux2 support."""
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "__init__.py").write_text("")
    (root / "comfy" / "supported_models.py").write_text(
        "class Flux2:\n    pass\n" if flux2 else "class Flux:\n    pass\n"
    )
    (root / "comfy_api").mkdir()
    (root / "comfy_api" / "__init__.py").write_text("")
    if v3_api:
        (root / "comfy_api" / "latest.py").write_text("raise ImportError('the pack must not import its nodes here')\n")
    return root


@pytest.mark.parametrize(
    ("v3_api", "flux2", "needle"),
    [(False, True, "comfy_api.latest"), (True, False, "Flux2"), (False, False, "comfy_api.latest")],
    ids=["no-v3-api", "no-flux2", "neither"],
)
def test_entrypoint_on_older_comfyui_logs_one_line(tmp_path: Path, v3_api: bool, flux2: bool, needle: str) -> None:
    """On a ComfyUI without the V3 API or FLUX.2, comfy_entrypoint returns None and logs one line (INFO+) naming why."""
    root = _fake_comfyui(tmp_path / "ComfyUI", v3_api=v3_api, flux2=flux2)
    result = run_fresh(
        """
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append((record.levelname, record.getMessage()))
        logging.getLogger().addHandler(Keep())
        logging.getLogger().setLevel(logging.INFO)  # ComfyUI logs at INFO
        register_pack()
        import klein_lora_lab
        ext = asyncio.run(klein_lora_lab.comfy_entrypoint())
        print(json.dumps({"ext": repr(ext), "records": records}))
        """,
        extra_path=root,
    )
    assert result["ext"] == "None"
    assert len(result["records"]) == 1, result["records"]
    level, message = result["records"][0]
    assert level == "WARNING"
    assert "Klein LoRA Lab" in message and needle in message and "update ComfyUI" in message
