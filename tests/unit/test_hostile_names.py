"""Hostile names and paths: nothing is read or written outside the allowed folders, and no pickle is ever loaded.

Names (run names, folder names the pack creates) go through safe_paths.safe_name / child_path; typed paths (albums,
run selections) through safe_paths.resolve_inside. Every row checks the refusal (UnsafePathError naming the value
and a fix) and that a folder outside the allowed roots is untouched afterwards.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from klein_lora_lab.trainer_core.files.safe_paths import (
    MAX_NAME_BYTES,
    UnsafePathError,
    child_path,
    resolve_inside,
    safe_name,
)
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.settings import TrainSettings

PACK_ROOT = Path(__file__).resolve().parents[2]

BAD_NAMES = [
    "",
    "   ",
    ".",
    "..",
    "../escape",
    "..\\escape",
    "a/b",
    "/etc/passwd",
    "C:\\Windows",
    "a\x00b",
    "tab\there",
    "line\nbreak",
    ".hidden",
    "name.",
    "a:b",
    "what?",
    "CON",
    "nul.txt",
    "com1",
    "Lpt9.log",
    "x" * (MAX_NAME_BYTES + 1),
    "é" * (MAX_NAME_BYTES // 2 + 1),  # short in characters, too long in bytes
]
GOOD_NAMES = ["tok_style_v1", "my run 2", "ünïcode-名前", "a.b", "x" * MAX_NAME_BYTES, "console", "nullable"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:30] for n in BAD_NAMES])
def test_bad_names_are_refused_with_the_value_and_a_fix(name: str) -> None:
    """Separators, '.'/'..', NUL and control characters, Windows-forbidden and reserved names, hidden names and
    over-long names (in UTF-8 bytes) are refused; the message shows the value (repr: NUL visible) and a fix."""
    with pytest.raises(UnsafePathError) as info:
        safe_name(name, "run name")
    message = str(info.value)
    assert "run name" in message
    if name.strip():
        assert repr(name.strip())[:40] in message or "bytes" in message
    assert any(w in message for w in ("use ", "remove", "type the name", "at most")), message


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_ordinary_names_pass_unchanged(name: str) -> None:
    """Letters, digits, spaces, unicode, dots inside and names that only start like reserved ones are accepted."""
    assert safe_name(f"  {name} ") == name


@pytest.fixture()
def roots(tmp_path: Path) -> dict[str, Path]:
    """ComfyUI-like folders plus a 'secret' folder outside them, with a file in it."""
    layout = {k: tmp_path / k for k in ("input", "output", "models", "secret")}
    for p in layout.values():
        p.mkdir()
    (layout["secret"] / "passwd").write_text("secret")
    (layout["secret"] / "album").mkdir()
    (layout["input"] / "album").mkdir()
    (layout["models"] / "loras").mkdir()
    return layout


def _allowed(r: dict[str, Path]) -> list[Path]:
    return [r["input"], r["output"], r["models"]]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


HOSTILE_PATHS = [
    ("dot-dot", lambda r: "../secret"),
    ("dot-dot inside", lambda r: "album/../../secret/album"),
    ("dot-dot that stays inside", lambda r: "album/../album"),
    ("backslash dot-dot", lambda r: "..\\secret"),
    ("absolute outside", lambda r: str(r["secret"] / "album")),
    ("absolute file outside", lambda r: str(r["secret"] / "passwd")),
    ("root", lambda r: "/"),
    ("home", lambda r: "~"),
    ("NUL byte", lambda r: "album\x00/../../secret"),
    ("control character", lambda r: "album\x1b[31m"),
    ("very long path", lambda r: "a/" * 700),
    ("very long component", lambda r: "a" * 300),
    ("symlink out", lambda r: _link(r["input"] / "link", r["secret"])),
    ("path through a symlink out", lambda r: _link(r["input"] / "link2", r["secret"]) + "/album"),
    ("symlinked file out", lambda r: _link(r["input"] / "album" / "img.png", r["secret"] / "passwd")),
    ("symlink chain out", lambda r: _chain(r)),
    ("quoted outside", lambda r: f'"{r["secret"]}"'),
    ("empty", lambda r: "   "),
]


def _link(link: Path, target: Path) -> str:
    link.symlink_to(target, target_is_directory=target.is_dir())
    return str(link)


def _chain(r: dict[str, Path]) -> str:
    (r["output"] / "hop").symlink_to(r["secret"], target_is_directory=True)
    (r["input"] / "first").symlink_to(r["output"] / "hop", target_is_directory=True)
    return "first"


@pytest.mark.parametrize("make", [m for _, m in HOSTILE_PATHS], ids=[n for n, _ in HOSTILE_PATHS])
def test_hostile_paths_cannot_leave_the_allowed_folders(make, roots: dict[str, Path]) -> None:
    """'..' (any spelling), absolute paths outside, symlinks (direct, nested, chained, to files) leading out, NUL
    and control characters, over-long paths and components are refused, naming the value and a fix; the outside
    folder is untouched."""
    before = _snapshot(roots["secret"])
    text = make(roots)
    with pytest.raises(UnsafePathError) as info:
        resolve_inside(text, _allowed(roots), "album folder", base=roots["input"])
    message = str(info.value)
    assert "album folder" in message
    assert any(w in message for w in ("Fix", "give", "remove", "use a shorter", "rename", "type the name")), message
    assert _snapshot(roots["secret"]) == before


ALLOWED_PATHS = [
    ("relative", lambda r: "album", "input/album"),
    ("relative, missing yet", lambda r: "new_album/sub", "input/new_album/sub"),
    ("absolute inside output", lambda r: str(r["output"]), "output"),
    ("absolute inside models", lambda r: str(r["models"] / "loras"), "models/loras"),
    (
        "symlink to another allowed folder",
        lambda r: _link(r["input"] / "to_models", r["models"] / "loras"),
        "models/loras",
    ),
    ("quoted and padded", lambda r: '  "album"  ', "input/album"),
    ("pasted with a newline", lambda r: "album\n", "input/album"),
]


@pytest.mark.parametrize(("make", "want"), [(m, w) for _, m, w in ALLOWED_PATHS], ids=[a[0] for a in ALLOWED_PATHS])
def test_paths_inside_the_allowed_folders_resolve(make, want: str, roots: dict[str, Path]) -> None:
    """Ordinary album paths resolve to their real location, including a symlink between two allowed folders."""
    got = resolve_inside(make(roots), _allowed(roots), "album folder", base=roots["input"])
    assert got == Path(os.path.realpath(roots["input"].parent / want))


def test_child_path_refuses_a_planted_symlink(roots: dict[str, Path]) -> None:
    """A run folder name that exists as a symlink to a folder outside the runs folder is refused (a write there would
    land outside); an ordinary child is returned as root/name."""
    runs = roots["output"] / "runs"
    runs.mkdir()
    (runs / "evil").symlink_to(roots["secret"], target_is_directory=True)
    with pytest.raises(UnsafePathError, match="evil.*outside"):
        child_path(runs, "evil", what="run name")
    with pytest.raises(UnsafePathError):
        child_path(runs, "..", what="run name")
    assert child_path(runs, "fine") == runs / "fine"


@pytest.mark.parametrize("entry", ["checkpoints", "samples", "metrics.jsonl", "run.json"])
def test_run_folder_refuses_entries_linked_outside(entry: str, roots: dict[str, Path]) -> None:
    """A run folder whose checkpoints/, samples/, metrics.jsonl or run.json is a symlink out of it is refused on create
    and on open: no checkpoint, sample or metric can be written through it."""
    run = roots["output"] / "run"
    run.mkdir()
    target = roots["secret"] / entry
    if "." in entry:
        target.write_text("{}")
    else:
        target.mkdir()
    (run / entry).symlink_to(target, target_is_directory=target.is_dir())
    before = _snapshot(roots["secret"])
    with pytest.raises(UnsafePathError, match=entry):
        RunFolder.create(run, TrainSettings(), {})
    with pytest.raises(UnsafePathError, match=entry):
        RunFolder.open(run)
    assert _snapshot(roots["secret"]) == before


# ------------------------------------------------------------------------------------------------ no pickle

_CODE_DIRS = ("trainer_core", "nodes", "benchmarks", "scripts")


def _pack_sources() -> list[Path]:
    files = [PACK_ROOT / "__init__.py"]
    for folder in _CODE_DIRS:
        files += sorted((PACK_ROOT / folder).rglob("*.py"))
    return files


def _pickle_uses(path: Path) -> list[str]:
    """Every pickle-capable load or import in a file: pickle/dill/joblib/shelve/marshal imports, torch.load without
    weights_only=True, np.load with allow_pickle=True, torch.save (a pickle writer)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(
                (n or "").split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve", "marshal") for n in names
            ):
                found.append(f"{path.name}:{node.lineno} imports {names}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            call = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if call.endswith("torch.load") and kw.get("weights_only") != "True":
                found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if call.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") not in (None, "False"):
                found.append(f"{path.name}:{node.lineno} np.load with allow_pickle")
            if call.endswith("torch.save") or call in ("pickle.load", "pickle.loads"):
                found.append(f"{path.name}:{node.lineno} {call}")
    return found


def test_no_pickle_anywhere_in_the_pack() -> None:
    """Weights, checkpoints and optimizer state are safetensors only: no pickle import, no torch.save, no np.load with
    allow_pickle, and the one torch.load (other people's .pt LoRAs) runs with weights_only=True."""
    sources = _pack_sources()
    assert len(sources) > 20
    uses = [u for path in sources for u in _pickle_uses(path)]
    assert uses == []


def test_the_pickle_scan_sees_what_it_looks_for(tmp_path: Path) -> None:
    """The scanner itself finds each forbidden form (so an empty result above means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\ntorch.save({}, 'x')\n"
        "torch.load('x', weights_only=True)\nnp.load('x')\n"
    )
    assert len(_pickle_uses(bad)) == 5


def test_http_routes_live_in_one_module_and_take_run_names_through_run_path() -> None:
    """The pack's only HTTP routes are the training panel's, in nodes/comfy/routes.py, and every route that reads a
    run takes its name through `_run_of` -> `run_names.run_path` (safe_paths' rule: nothing outside the runs
    folder); the hostile names themselves are sent to the running server in tests/comfy/test_train_panel_comfy.py.
    A route added elsewhere fails here until it is reviewed and tested the same way."""
    markers = ("routes.get", "routes.post", "routes.put", "routes.delete", "add_route", "RouteTableDef")
    found = {
        str(path.relative_to(PACK_ROOT)) for path in _pack_sources() for marker in markers if marker in path.read_text()
    }
    assert found == {"nodes/comfy/routes.py"}
    source = (PACK_ROOT / "nodes" / "comfy" / "routes.py").read_text()
    assert "return run_path(name)" in source
    handlers = [block for block in source.split("\nasync def ")[1:] if "request.query" in block or ".json()" in block]
    assert handlers and all("_run_of(" in block for block in handlers), handlers
