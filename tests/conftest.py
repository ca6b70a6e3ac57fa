"""Test tiers: tests/unit (no ComfyUI), tests/comfy (real ComfyUI), tests/browser (Chromium), tests/gpu (CUDA).

The pack is importable as `klein_lora_lab` (tests import `klein_lora_lab.trainer_core...`). The tier marker is
set from the folder, so `pytest -m unit` selects the unit tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.comfy_env import comfy_path, import_comfy_inprocess
from harness.pack import register_pack

register_pack()

TIERS = ("unit", "comfy", "browser", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """A real ComfyUI checkout imported in this process (CPU). Skips the test when none is configured."""
    root = comfy_path()
    if root is None:
        pytest.skip("no ComfyUI: set COMFYUI_PATH to a ComfyUI checkout to run the comfy tier")
    import_comfy_inprocess(root)
    return root
