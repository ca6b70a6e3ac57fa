"""The house rules of the layout, checked on the source: trainer_core never reaches ComfyUI, node files never
import each other (shared pieces live in nodes/comfy), and every node's `execute` stays short."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness.comfy_env import PACK_ROOT

CORE = PACK_ROOT / "trainer_core"
NODE_GROUPS = ("train", "loras", "scrub", "diagnose")
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "server", "folder_paths", "nodes", "execution")
EXECUTE_MAX_LINES = 40


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _package_parts(path: Path) -> list[str]:
    """The package of a module as dotted parts relative to the pack root: nodes/scrub/x.py -> [nodes, scrub]."""
    return list(path.relative_to(PACK_ROOT).parent.parts)


def _imported(path: Path) -> list[tuple[int, list[str]]]:
    """(line, module parts) of every import in the file, top-level or inside functions; relative imports are
    resolved against the pack root (a part list starting with '..' leaves the pack), plus string imports
    through importlib.import_module / __import__."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_parts(path)
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, ["<abs>", *alias.name.split(".")]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = ["<abs>", *(node.module or "").split(".")]
            else:
                up = node.level - 1
                base = package[: len(package) - up] if up <= len(package) else [".."]
                base = [*base, *(node.module.split(".") if node.module else [])]
            if node.module is None:  # `from . import a, b`: each name is a module
                found += [(node.lineno, [*base, alias.name]) for alias in node.names]
            else:
                found.append((node.lineno, base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, ["<abs>", *node.args[0].value.split(".")]))
    return found


def test_trainer_core_imports_without_comfyui() -> None:
    """Every trainer_core module imports in a fresh Python with no ComfyUI folder on sys.path and the ComfyUI
    modules (comfy, comfy_api, comfy_extras, folder_paths, server) made unimportable."""
    code = f"""
    import importlib, importlib.abc, json, os, pkgutil, sys
    comfy = os.environ.get("COMFYUI_PATH")
    sys.path[:] = [p for p in sys.path if not (comfy and os.path.realpath(p or ".") == os.path.realpath(comfy))]
    BLOCKED = {("comfy", "comfy_api", "comfy_extras", "folder_paths", "server")!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, {str(PACK_ROOT / "tests")!r})
    from harness.pack import register_pack
    register_pack()
    import klein_lora_lab.trainer_core as core
    names = [m.name for m in pkgutil.walk_packages(core.__path__, core.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({{"modules": names, "leaked": leaked}}))
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    expected = {
        "klein_lora_lab." + ".".join(p.relative_to(PACK_ROOT).with_suffix("").parts)
        for p in _modules(CORE)
        if p.name != "__init__.py"
    }
    assert expected <= set(result["modules"]), sorted(expected - set(result["modules"]))


def _core_violations(path: Path) -> list[str]:
    bad = []
    for line, parts in _imported(path):
        outside = parts[0] == ".." or (parts[0] != "<abs>" and parts[0] != "trainer_core")
        comfy = parts[0] == "<abs>" and parts[1] in COMFY_MODULES
        pack_nodes = parts[0] == "<abs>" and parts[1] == "klein_lora_lab" and parts[2:3] != ["trainer_core"]
        if outside or comfy or pack_nodes:
            bad.append(f"{path.relative_to(PACK_ROOT)}:{line} imports {'.'.join(parts)}")
    return bad


def _node_violations(path: Path) -> list[str]:
    bad = []
    for line, parts in _imported(path):
        if parts[:2] == ["<abs>", "klein_lora_lab"]:
            parts = parts[2:]
        if parts[:1] == ["nodes"] and len(parts) >= 2 and parts[1] in NODE_GROUPS:
            bad.append(f"{path.relative_to(PACK_ROOT)}:{line} imports {'.'.join(parts)}")
    return bad


def test_no_trainer_core_module_names_comfyui() -> None:
    """No trainer_core module imports comfy / comfy_api / comfy_extras / server / folder_paths / nodes (ComfyUI's
    or the pack's), at top level, inside a function or through importlib; relative imports stay inside."""
    assert [v for path in _modules(CORE) for v in _core_violations(path)] == []


def _node_files() -> list[Path]:
    return [p for g in NODE_GROUPS for p in _modules(PACK_ROOT / "nodes" / g) if p.name != "__init__.py"]


def test_node_files_import_no_other_node_file() -> None:
    """A node file (nodes/train|loras|scrub|diagnose/*.py) imports only nodes/comfy, trainer_core and outside
    libraries, never another node file."""
    assert [v for path in _node_files() for v in _node_violations(path)] == []


def _executes() -> list[tuple[str, int]]:
    """(file:Class, body lines) of every `execute` method of a class in the node files."""
    out = []
    for path in _node_files():
        for cls in ast.parse(path.read_text()).body:
            if not isinstance(cls, ast.ClassDef):
                continue
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "execute":
                    out.append((f"{path.relative_to(PACK_ROOT)}:{cls.name}", fn.end_lineno - fn.body[0].lineno + 1))
    return out


def test_every_node_execute_is_short() -> None:
    """Every node's execute body is at most 40 lines: widgets -> a config -> a core call -> outputs."""
    found = _executes()
    assert len(found) >= 15  # every node of extension.NODE_MODULES is scanned
    assert [(name, n) for name, n in found if n > EXECUTE_MAX_LINES] == []


_read = Path.read_text


@pytest.mark.parametrize(
    "folder, source, caught",
    [
        ("nodes/diagnose", "from ..scrub.scrub_run import X\n", True),
        ("nodes/diagnose", "from .sweet_spot import X\n", True),
        ("nodes/diagnose", "def f():\n    from klein_lora_lab.nodes.train import train_lora\n", True),
        ("nodes/diagnose", "from ..comfy.widgets import MAX_SEED\n", False),
        ("nodes/diagnose", "from ...trainer_core.analysis.scrub import SEP\n", False),
        ("trainer_core/analysis", "def f():\n    import comfy.model_management\n", True),
        ("trainer_core/analysis", "import importlib\nimportlib.import_module('folder_paths')\n", True),
        ("trainer_core/analysis", "from ...nodes.comfy import paths\n", True),
        ("trainer_core/analysis", "from ..runs.runfolder import RunFolder\nimport torch\n", False),
    ],
)
def test_import_scans_catch_what_they_forbid(monkeypatch, folder: str, source: str, caught: bool) -> None:
    """The scans themselves: a forbidden import (relative, absolute, inside a function or by name) is caught,
    an allowed one is not."""
    path = PACK_ROOT / folder / "_scan_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == path else _read(self, *a, **k))
    scan = _node_violations if folder.startswith("nodes") else _core_violations
    assert bool(scan(path)) is caught
