"""scripts/setup.sh finds ComfyUI in the documented order, and uses the vendored tree only through a copy.

Each test lays out a fake repository (a copy of the real setup.sh) with fake ComfyUI trees around it, runs
`klein_setup_comfyui` in bash (KLEIN_LAB_PYTHON set, so nothing is installed; KLEIN_LAB_NO_CLONE=1, so nothing
is cloned) and reads the COMFYUI_PATH it exported. Offline and fast.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from harness.comfy_env import PACK_ROOT

SETUP = PACK_ROOT / "scripts" / "setup.sh"
VENDOR = Path("shared") / "vendor" / "ComfyUI-0.29.0"
COPY = Path(".cache") / "ComfyUI-0.29.0"


def fake_comfyui(root: Path, tag: str) -> Path:
    """A tree that passes setup.sh's ComfyUI check (main.py + comfy/), marked with `tag`."""
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "__init__.py").write_text(f"# {tag}\n")
    (root / "main.py").write_text(f"print({tag!r})\n")
    (root / "requirements.txt").write_text("")
    return root


def fake_repo(repo: Path) -> Path:
    (repo / "scripts").mkdir(parents=True)
    shutil.copyfile(SETUP, repo / "scripts" / "setup.sh")
    (repo / "requirements.txt").write_text("")
    return repo


def make_read_only(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def listing(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def run_setup(repo: Path, **env: str) -> subprocess.CompletedProcess:
    """`klein_setup_comfyui` under `set -euo pipefail`, as the scripts run it; prints the chosen COMFYUI_PATH."""
    base = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "CI", "KLEIN_LAB_NO_CLONE")}
    script = 'set -euo pipefail; source scripts/setup.sh; klein_setup_comfyui; echo "CHOSEN=${COMFYUI_PATH:-}"'
    return subprocess.run(
        ["bash", "-c", script],
        cwd=repo,
        env={**base, "KLEIN_LAB_PYTHON": sys.executable, "KLEIN_LAB_NO_CLONE": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def chosen(proc: subprocess.CompletedProcess) -> Path | None:
    assert proc.returncode == 0, proc.stderr
    value = proc.stdout.strip().splitlines()[-1].removeprefix("CHOSEN=")
    return Path(value).resolve() if value else None


def test_comfyui_path_wins_over_everything(tmp_path: Path) -> None:
    """COMFYUI_PATH is used as given, even with an enclosing ComfyUI and a vendored tree present."""
    outer = fake_comfyui(tmp_path / "ComfyUI", "outer")
    repo = fake_repo(outer / "custom_nodes" / "pack")
    fake_comfyui(outer / "custom_nodes" / VENDOR, "vendored")
    own = fake_comfyui(tmp_path / "own", "own")
    assert chosen(run_setup(repo, COMFYUI_PATH=str(own))) == own.resolve()
    assert not (repo / COPY).exists()


def test_enclosing_comfyui_wins_over_the_vendored_tree(tmp_path: Path) -> None:
    """A pack in ComfyUI/custom_nodes/<pack> uses that ComfyUI; the vendored tree beside it is neither used nor
    copied."""
    outer = fake_comfyui(tmp_path / "ComfyUI", "outer")
    repo = fake_repo(outer / "custom_nodes" / "pack")
    fake_comfyui(outer / "custom_nodes" / VENDOR, "vendored")
    assert chosen(run_setup(repo)) == outer.resolve()
    assert not (repo / COPY).exists()


def test_vendored_tree_is_copied_not_used_in_place(tmp_path: Path) -> None:
    """Without COMFYUI_PATH or an enclosing ComfyUI, ../shared/vendor/ComfyUI-0.29.0 is copied into
    .cache/ComfyUI-0.29.0 (writable, same files) and the copy is chosen; the read-only source is left exactly as
    it was, and the vendored tree wins over an earlier clone in .cache/ComfyUI."""
    repo = fake_repo(tmp_path / "main")
    vendored = fake_comfyui(tmp_path / VENDOR, "vendored")
    fake_comfyui(repo / ".cache" / "ComfyUI", "clone")
    before = listing(vendored)
    make_read_only(vendored)
    try:
        picked = chosen(run_setup(repo))
        assert picked == (repo / COPY).resolve()
        copied = {k: v for k, v in listing(picked).items() if k != ".klein-lab-source-stamp"}
        assert copied == before
        assert all(p.stat().st_mode & stat.S_IWUSR for p in [picked, *picked.rglob("*")])
        assert listing(vendored) == before
    finally:
        make_writable(vendored)


def test_vendored_copy_is_made_once_and_refreshed_when_the_source_changes(tmp_path: Path) -> None:
    """A second run keeps the existing copy (what ComfyUI wrote there stays); a changed source file makes the
    next run copy the tree again."""
    repo = fake_repo(tmp_path / "main")
    vendored = fake_comfyui(tmp_path / VENDOR, "vendored")
    copy = chosen(run_setup(repo))
    assert copy is not None
    written = copy / "comfy" / "written_by_comfyui.txt"
    written.write_text("kept")
    assert chosen(run_setup(repo)) == copy and written.read_text() == "kept"

    (vendored / "main.py").write_text("print('vendored, updated')\n")
    assert chosen(run_setup(repo)) == copy
    assert not written.exists()
    assert (copy / "main.py").read_text() == "print('vendored, updated')\n"


def test_clone_is_the_last_resort(tmp_path: Path) -> None:
    """With no vendored tree, an existing clone in .cache/ComfyUI is used."""
    repo = fake_repo(tmp_path / "main")
    clone = fake_comfyui(repo / ".cache" / "ComfyUI", "clone")
    assert chosen(run_setup(repo)) == clone.resolve()


def test_no_comfyui_is_a_loud_line_outside_ci_and_a_failure_in_ci(tmp_path: Path) -> None:
    """Nothing to find and no clone allowed: outside CI the step goes on with a loud line and no COMFYUI_PATH;
    with CI=true it fails with the reason. A COMFYUI_PATH that is not a ComfyUI fails in CI the same way."""
    repo = fake_repo(tmp_path / "main")
    relaxed = run_setup(repo)
    assert chosen(relaxed) is None
    assert "!!!" in relaxed.stderr and "COMFYUI_PATH" in relaxed.stderr

    strict = run_setup(repo, CI="true")
    assert strict.returncode != 0 and "CHOSEN=" not in strict.stdout
    assert "CI=true" in strict.stderr and "no ComfyUI" in strict.stderr

    bad = run_setup(repo, CI="true", COMFYUI_PATH=str(tmp_path / "nowhere"))
    assert bad.returncode != 0 and "is not a ComfyUI checkout" in bad.stderr
