"""The pack installs the way ComfyUI-Manager installs it, and that install leaves torch alone.

Manager's steps, done for real: `git clone <repo>` into a clean ComfyUI base directory's `custom_nodes/`, then
`pip install -r requirements.txt` with the Python of an environment that already has ComfyUI's requirements
(a fresh venv on top of the running interpreter's packages: `--system-site-packages`, plus this interpreter's
site-packages when it is itself a venv). The test proves the pip step changes no torch package (pip's
`--dry-run --report` plans none of them; torch/torchvision/torchaudio versions and `pip freeze` lines are the
same before and after), then starts ComfyUI with that interpreter and that custom_nodes: every node the clone
declares is in /object_info and the log has no import error for the pack. Pip may only reach PyPI; when it
needs the network and cannot get it, the test is skipped with the reason. Figures (pip time, versions) are
printed.
"""

from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.comfy_env import PACK_ROOT, comfy_path
from harness.server import ComfyServer, pack_import_errors

TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")
CLONE_NAME = "comfyui-klein-lora-lab"  # the folder Manager makes from the repository's name
PIP_FLAGS = ["--disable-pip-version-check", "--no-input", "--timeout", "10", "--retries", "0"]
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution", "timed out")


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _make_env(env_dir: Path) -> Path:
    """A venv that sees the running interpreter's packages (ComfyUI's requirements) and installs into itself."""
    done = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)])
    assert done.returncode == 0, done.stderr
    python = env_dir / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # This interpreter is itself a venv: --system-site-packages would only expose the base Python's packages,
        # so its site-packages (torch, ComfyUI's requirements, pip) join the new env's path after the env's own.
        own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
        (Path(own.stdout.strip()) / "_comfyui_env.pth").write_text(lines)
    return python


def _versions(python: Path) -> dict[str, str]:
    names = ", ".join(repr(p) for p in TORCH_PACKAGES)
    code = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in ({names},)}}))"
    done = _run([str(python), "-c", code])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _freeze(python: Path) -> set[str]:
    done = _run([str(python), "-m", "pip", "freeze", *PIP_FLAGS[:2]])
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines())


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    done = _run([str(python), "-m", "pip", *args, *PIP_FLAGS], timeout=600)
    if done.returncode != 0 and any(marker in done.stdout + done.stderr for marker in NETWORK_ERRORS):
        pytest.skip(f"!!! PyPI unreachable, the Manager-style install was not checked: {done.stderr[-500:]}")
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def _is_torch(line: str) -> bool:
    name = re.split(r"[=<>@ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")
    return name in TORCH_PACKAGES


def test_manager_style_install_keeps_torch_and_loads_every_node(tmp_path, capsys) -> None:
    """git clone + pip install -r requirements.txt into an env with ComfyUI's requirements: pip plans and makes
    no torch change, and ComfyUI started from that env lists every node the clone declares, with no import
    error for the pack."""
    root = comfy_path()
    if root is None:
        pytest.skip("no ComfyUI: set COMFYUI_PATH")
    if shutil.which("git") is None or not (PACK_ROOT / ".git").exists():
        pytest.skip("!!! no git or this checkout is not a git repository: the clone step cannot run")
    base = tmp_path / "comfy_base"
    clone = base / "custom_nodes" / CLONE_NAME
    clone.parent.mkdir(parents=True)
    done = _run(["git", "clone", "--quiet", str(PACK_ROOT), str(clone)])
    assert done.returncode == 0, done.stderr

    python = _make_env(tmp_path / "env")
    before, freeze_before = _versions(python), _freeze(python)
    requirements = str(clone / "requirements.txt")
    start = time.perf_counter()
    _pip(python, "install", "--dry-run", "--report", str(tmp_path / "report.json"), "-r", requirements)
    planned = [item["metadata"]["name"] for item in json.loads((tmp_path / "report.json").read_text())["install"]]
    installed = _pip(python, "install", "-r", requirements)
    pip_s = time.perf_counter() - start
    after, freeze_after = _versions(python), _freeze(python)

    assert not [name for name in planned if _is_torch(name)], planned
    assert after == before
    changed = freeze_before ^ freeze_after
    assert not [line for line in changed if _is_torch(line)], changed

    server = ComfyServer.start(root, base, python=str(python))
    try:
        info = server.object_info()
        log = server.log_text()
    finally:
        server.stop()
    declared = set()
    for source in (clone / "nodes").rglob("*.py"):
        declared |= set(re.findall(r'node_id="(KleinLab\w+)"', source.read_text()))
    assert declared and declared <= set(info), sorted(declared - set(info))
    assert pack_import_errors(log, CLONE_NAME) == []
    with capsys.disabled():
        print(
            f"\n[install] pip (dry-run report, then install -r requirements.txt): {pip_s:.1f} s; "
            f"planned installs: {planned or 'none'}; freeze changes: {sorted(changed) or 'none'}; "
            f"torch packages before = after = {after}; ComfyUI start {server.startup_s:.1f} s, "
            f"{len(declared)} pack nodes listed; pip said: {installed.stdout.strip().splitlines()[-1]}"
        )
