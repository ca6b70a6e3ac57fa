"""What a spawned training process runs first (by path, through runpy.run_path; see spawn.py): register this pack
under the parent's module name, then unpickle the payload and call the target. Only the standard library is
imported before the pack is registered."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys


def _register_pack(name: str, root: str) -> None:
    """Import the pack folder `root` as the package `name`, as ComfyUI and the test harness do."""
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, f"{root}/__init__.py", submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def main(init: dict) -> None:
    import torch

    torch.set_num_threads(init["THREADS"])
    _register_pack(init["PACK_NAME"], init["PACK_DIR"])
    module, function = init["TARGET"].split(":")
    target = getattr(importlib.import_module(f"{init['PACK_NAME']}.{module}"), function)
    target(pickle.loads(init["PAYLOAD"]), **init["CHANNELS"])


if __name__ == "__klein_lab_worker__":
    main(globals())
