"""Finding and importing a real ComfyUI checkout for the `comfy` test tier."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def comfy_path() -> Path | None:
    """ComfyUI's root: $COMFYUI_PATH, or the checkout this pack sits in (ComfyUI/custom_nodes/<pack>)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        return path if (path / "comfy").is_dir() and (path / "main.py").is_file() else None
    parent = PACK_ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "comfy").is_dir():
        return parent.parent
    return None


def import_comfy_inprocess(root: Path) -> None:
    """Make ComfyUI's modules importable in this process, on the CPU, without parsing pytest's argv."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_api_nodes = True


def import_comfy_for_cuda() -> str | None:
    """Import ComfyUI in this process for the GPU, or say why not (a reason for pytest.skip).

    ComfyUI's model management reads the device once, when first imported, so this only works in a process that
    has not imported it for the CPU already (run a tests/gpu file on its own)."""
    root = comfy_path()
    if root is None:
        return "needs ComfyUI: set COMFYUI_PATH"
    if "comfy.model_management" in sys.modules:
        return "ComfyUI was already imported in this process (for the CPU?): run this tests/gpu file on its own"
    import_comfy_inprocess(root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = False
    return None
