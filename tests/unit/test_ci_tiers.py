"""With CI=true a test tier that cannot run is an error, not a skip; the gpu tier alone may still skip.

Runs pytest in a subprocess on a throwaway copy of this conftest and harness with one fake test in the tier,
ComfyUI absent (COMFYUI_PATH pointing nowhere) and no CUDA device visible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from harness.comfy_env import PACK_ROOT


def run_tier(tmp_path: Path, tier: str, ci: str | None) -> subprocess.CompletedProcess:
    tests = tmp_path / "tests"
    shutil.copytree(PACK_ROOT / "tests" / "harness", tests / "harness")
    shutil.copyfile(PACK_ROOT / "tests" / "conftest.py", tests / "conftest.py")
    shutil.copyfile(PACK_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")  # the same pytest settings
    (tmp_path / "__init__.py").write_text("")  # conftest registers this folder as the pack
    (tests / tier).mkdir()
    (tests / tier / f"test_fake_{tier}.py").write_text("def test_needs_the_tier():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["COMFYUI_PATH"] = str(tmp_path / "no-comfyui-here")
    env["CUDA_VISIBLE_DEVICES"] = ""
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{tier}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_comfyui_skips_loudly_outside_ci(tmp_path: Path) -> None:
    """No CI: the comfy tier is skipped with its one loud line, and pytest passes."""
    proc = run_tier(tmp_path, "comfy", ci=None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COMFY TIER SKIPPED (1 tests)" in proc.stdout


def test_missing_comfyui_fails_in_ci(tmp_path: Path) -> None:
    """CI=true: the same run is an error that names the tier and the reason."""
    proc = run_tier(tmp_path, "comfy", ci="true")
    assert proc.returncode not in (0, 5), proc.stdout + proc.stderr
    assert "CI=true and the comfy tier cannot run" in proc.stdout + proc.stderr
    assert "no ComfyUI found" in proc.stdout + proc.stderr


def test_gpu_tier_still_skips_in_ci(tmp_path: Path) -> None:
    """CI=true on a machine without CUDA: the gpu tier skips with its loud line and pytest passes."""
    proc = run_tier(tmp_path, "gpu", ci="true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU TIER SKIPPED (1 tests)" in proc.stdout
