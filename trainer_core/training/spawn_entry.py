"""What a spawned training process runs first (by path, through runpy.run_path; see spawn.py): register this pack
under the parent's module name, then read the payload from the setup queue and call the target. Only the standard
library and torch are imported before the pack is registered."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig


def _register_pack(name: str, root: str) -> None:
    """Import the pack folder `root` as the package `name`, as ComfyUI and the test harness do."""
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, f"{root}/__init__.py", submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _stdlib_first() -> None:
    """Put the standard library ahead of every other sys.path entry. The parent's sys.path (copied into this
    process) may hold folders with modules named like standard ones (ComfyUI adds its `comfy` folder, which has
    a logging.py); the parent imported the standard modules before that entry came, so must this process."""
    paths = sysconfig.get_paths()
    std = {os.path.realpath(paths["stdlib"]), os.path.realpath(paths["platstdlib"])}
    first = [p for p in sys.path if os.path.realpath(p) in std or os.path.realpath(os.path.dirname(p)) in std]
    first = [p for p in first if not p.rstrip("/").endswith("site-packages")]
    sys.path[:] = first + [p for p in sys.path if p not in first]


def main(init: dict) -> None:
    _stdlib_first()
    import torch

    torch.set_num_threads(init["THREADS"])
    _register_pack(init["PACK_NAME"], init["PACK_DIR"])
    module, function = init["TARGET"].split(":")
    target = getattr(importlib.import_module(f"{init['PACK_NAME']}.{module}"), function)
    target(init["SETUP"].get(), **init["CHANNELS"])


if __name__ == "__klein_lab_worker__":
    main(globals())
