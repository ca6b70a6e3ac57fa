"""The benchmark scripts (benchmarks/*.py, not a package) imported by file for their smoke tests."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from .comfy_env import PACK_ROOT


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module `<name>` (imported once per process)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
