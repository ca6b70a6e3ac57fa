"""The test harness itself: fixture caching, server start failures, and import-error detection in the log.

These run without ComfyUI: a fake `main.py` stands in for the server where only the harness is under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import fixtures
from harness.server import ComfyServer, ServerError, pack_import_errors
from safetensors.torch import load_file


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(fixtures, "CACHE_ROOT", tmp_path / "fixtures")
    return tmp_path / "fixtures"


def test_tiny_klein_file_is_cached_and_holds_the_seeded_weights(cache_root: Path) -> None:
    """The file is built once per (spec, seed, code), holds exactly tiny_klein_state_dict, and seeds differ."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein_state_dict

    spec = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
    first = fixtures.tiny_klein_path(spec, seed=3)
    mtime = first.stat().st_mtime_ns
    assert fixtures.tiny_klein_path(spec, seed=3) == first and first.stat().st_mtime_ns == mtime
    assert first.parent == cache_root
    stored, expected = load_file(str(first)), tiny_klein_state_dict(spec, seed=3)
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert fixtures.tiny_klein_path(spec, seed=4) != first
    assert list(cache_root.glob("*.tmp")) == []  # atomic writes leave no partial files


def test_conditioning_file_matches_context_width(cache_root: Path) -> None:
    """The saved conditioning has the spec's context width and equals tiny_conditioning for the same seed."""
    from klein_lora_lab.trainer_core.model.tiny import TinySpec

    spec = TinySpec(context_dim=24)
    cond = load_file(str(fixtures.tiny_conditioning_path(spec, tokens=5, seed=1)))["cond"]
    assert cond.shape == (1, 5, 24)
    assert torch.equal(cond, fixtures.tiny_conditioning(spec, tokens=5, seed=1))


def _fake_comfyui(root: Path, main_py: str) -> Path:
    root.mkdir()
    (root / "main.py").write_text(main_py)
    return root


def test_server_start_failure_reports_log_tail(tmp_path: Path) -> None:
    """A server that dies during startup raises ServerError carrying the exit code and the log's last lines."""
    root = _fake_comfyui(tmp_path / "ComfyUI", "import sys\nprint('boom: missing module xyz')\nsys.exit(3)\n")
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(ServerError, match="(?s)exited with code 3.*boom: missing module xyz"):
        ComfyServer.start(root, base, timeout_s=30)


def test_server_that_never_answers_times_out(tmp_path: Path) -> None:
    """A server that never serves /object_info fails after the timeout, and its process is stopped."""
    root = _fake_comfyui(tmp_path / "ComfyUI", "import time\nprint('starting', flush=True)\ntime.sleep(600)\n")
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(ServerError, match="(?s)did not answer /object_info.*starting"):
        ComfyServer.start(root, base, timeout_s=2)


def test_pack_import_errors_finds_only_our_failures() -> None:
    """Import failures and tracebacks (as ComfyUI 0.29 logs them, colour codes included) are reported for our
    pack and ignored for other packs."""
    warn, info = "\x1b[1m\x1b[33m[WARNING]\x1b[0m ", "\x1b[32m[INFO]\x1b[0m "
    ours = f"{info}   0.0 seconds (IMPORT FAILED): /tmp/base/custom_nodes/klein_lora_lab"
    other = f"{info}   0.1 seconds (IMPORT FAILED): /tmp/base/custom_nodes/some_other_pack"
    trace = (
        f"{warn}Traceback (most recent call last):\n"
        '  File "/tmp/base/custom_nodes/klein_lora_lab/__init__.py", line 1, in <module>\n'
        "ModuleNotFoundError: No module named 'xyz'"
    )
    other_trace = trace.replace("klein_lora_lab", "some_other_pack")
    assert pack_import_errors(f"ok\n{other}\n{other_trace}\n") == []
    assert pack_import_errors(f"ok\n{ours}\n") == [ours.replace("\x1b[32m", "").replace("\x1b[0m", "")]
    assert len(pack_import_errors(f"ok\n{trace}\n")) == 1
