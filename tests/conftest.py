"""Test tiers: tests/unit (no ComfyUI), tests/comfy (real ComfyUI), tests/browser (Chromium), tests/gpu (CUDA).

The pack is importable as `klein_lora_lab` (tests import `klein_lora_lab.trainer_core...`). The tier marker is
set from the folder, so `pytest -m unit` selects the unit tier. A tier whose requirements are missing is
skipped as a whole, and the terminal summary prints one loud line per skipped tier saying how to enable it.
With CI=true such a tier is an error instead (CI must never pass with a tier left out), except the gpu tier:
CI has no GPU, so that tier is expected to skip with its loud line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.comfy_env import PACK_ROOT, comfy_path, import_comfy_inprocess
from harness.pack import register_pack

register_pack()

TIERS = ("unit", "comfy", "browser", "gpu")
SKIP_TAG = "[{tier} tier skipped]"
BROWSER_DIR = PACK_ROOT / "tests" / "browser"
CHROMIUM = Path(os.environ.get("KLEIN_LAB_CHROMIUM", "/usr/bin/chromium"))


def _tier_of(item: pytest.Item) -> str | None:
    parts = Path(str(item.fspath)).parts
    return next((tier for tier in TIERS if tier in parts), None)


def comfy_missing() -> str | None:
    if comfy_path() is None:
        return "no ComfyUI found; set COMFYUI_PATH=/path/to/ComfyUI (or clone this pack into ComfyUI/custom_nodes/)"
    return None


def browser_missing() -> str | None:
    missing = []
    if comfy_path() is None:
        missing.append("ComfyUI (set COMFYUI_PATH=/path/to/ComfyUI)")
    if not CHROMIUM.is_file():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium fonts-liberation)")
    if shutil.which("node") is None:
        missing.append("Node.js (apt-get install -y nodejs npm)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (cd tests/browser && npm install)")
    return "missing " + "; ".join(missing) if missing else None


def gpu_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device (the gpu tier runs benchmarks on a GPU machine)"


MISSING = {"comfy": comfy_missing, "browser": browser_missing, "gpu": gpu_missing}
# Tiers that may be skipped for a missing requirement even in CI.
CI_MAY_SKIP = ("gpu",)


def in_ci() -> bool:
    """CI=true (also 1 or yes, any case), as CI services set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}
    for item in items:
        tier = _tier_of(item)
        if tier is None:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier in MISSING:
            if tier not in reasons:
                reasons[tier] = MISSING[tier]()
            if reasons[tier] is not None and in_ci() and tier not in CI_MAY_SKIP:
                raise pytest.UsageError(f"CI=true and the {tier} tier cannot run: {reasons[tier]}")
            if reasons[tier] is not None:
                item.add_marker(pytest.mark.skip(reason=f"{SKIP_TAG.format(tier=tier)} {reasons[tier]}"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One loud line per tier that was skipped for a missing requirement (never a silent skip)."""
    counts: dict[str, tuple[int, str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for tier in MISSING:
            tag = SKIP_TAG.format(tier=tier)
            if tag in reason:
                n, _ = counts.get(tier, (0, ""))
                counts[tier] = (n + 1, reason.split(tag, 1)[1].strip())
    for tier, (n, why) in counts.items():
        terminalreporter.write_line(f"!!! {tier.upper()} TIER SKIPPED ({n} tests): {why}", yellow=True, bold=True)


# --- shared fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """A real ComfyUI checkout imported in this process (CPU). Skips the test when none is configured."""
    root = comfy_path()
    if root is None:
        pytest.skip("no ComfyUI: set COMFYUI_PATH to a ComfyUI checkout to run the comfy tier")
    import_comfy_inprocess(root)
    return root


@pytest.fixture(scope="session")
def tiny_spec():
    """The tiny Klein spec every comfy/browser-tier fixture file is built from."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec

    return TinySpec()


@pytest.fixture(scope="session")
def tiny_model_file(tiny_spec) -> Path:
    """Cached safetensors of the seeded tiny Klein (UNETLoader detects it as flux2)."""
    from harness.fixtures import tiny_klein_path

    return tiny_klein_path(tiny_spec, seed=0)


@pytest.fixture(scope="session")
def flux2_vae_file() -> Path:
    """Cached random full-shape Flux2 VAE (~84M parameters, bf16)."""
    from harness.vae import flux2_vae_path

    return flux2_vae_path(seed=0)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_model_file, flux2_vae_file) -> Iterator:
    """One real ComfyUI server per session (CPU, loopback) with the pack in custom_nodes. Skips without ComfyUI."""
    from harness.server import ComfyServer, prepare_base_dir

    root = comfy_path()
    if root is None:
        pytest.skip("no ComfyUI: set COMFYUI_PATH to a ComfyUI checkout to run the comfy tier")
    base = prepare_base_dir(tmp_path_factory.mktemp("comfy_base"), tiny_model_file, flux2_vae_file)
    server = ComfyServer.start(root, base)
    try:
        yield server
    finally:
        server.stop()
