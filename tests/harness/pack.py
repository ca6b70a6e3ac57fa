"""Import this checkout as the package `klein_lora_lab`, whatever its folder is called (as ComfyUI would)."""

from __future__ import annotations

import importlib.util
import sys

from .comfy_env import PACK_ROOT

PACKAGE = "klein_lora_lab"


def register_pack() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
