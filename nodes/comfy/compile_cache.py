"""The compile cache of the blocks kept in ComfyUI's user folder, so a restart reuses it.

torch.compile's inductor caches its compiled graphs (FX graph and AOTAutograd caches, Triton kernels) under
TORCHINDUCTOR_CACHE_DIR, by default a per-user folder in the system's temp directory, which a reboot or a temp
cleaner may empty. During training the pack points it at `<user>/klein_lora_lab/compile-cache`, unless the user
chose a folder of their own, and restores the variable afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import folder_paths

ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    return Path(folder_paths.get_user_directory()) / "klein_lora_lab" / "compile-cache"


def _torch_default() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


@contextmanager
def pack_compile_cache(enabled: bool = True) -> Iterator[str | None]:
    """Inductor's cache folder set to the pack's for the duration (yields the folder in use; None when not
    `enabled`, i.e. nothing compiles). A folder the user set is kept; torch's default (which inductor writes
    into the variable on first use) is replaced."""
    previous = os.environ.get(ENV)
    if not enabled or (previous is not None and previous != _torch_default()):
        yield previous if enabled else None
        return
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(folder)
    try:
        yield str(folder)
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
