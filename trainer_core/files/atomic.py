"""The pack's one file writer: atomic (readers see the old file or the whole new one) and disk-full aware.

Every file the pack writes goes through `atomic_write_bytes` (or `atomic_write_with`, for writers such as PIL that
want a file object): LoRA checkpoints and resume states, run.json, metrics rewrites, the encode cache, the
sweet-spot report, previews and scrub frames. A full disk raises `DiskFullError`, which names the file, the free
space and the fix; the temporary file is removed whatever happens.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import pack_error

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@pack_error
class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; the message names the file and the fix.
    Whatever the file held before is unchanged (atomic writes never replace a file with a partial one)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(errno.ENOSPC, message)
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _DISK_FULL


def disk_full_error(path: Path, size: int, err: OSError) -> DiskFullError:
    """The DiskFullError for a failed write of `size` bytes to `path` (free space measured now)."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"could not write {path}: the disk is full ({free}, {size / 2**20:.1f} MiB needed; {err.strerror}). "
        f"{path.name} was not changed and no partial file was left. Fix: free disk space on the drive of "
        f"{path.parent} (e.g. delete old checkpoints or runs), then resume.",
        path,
    )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a torn one:
    a temporary file in the same folder, fsync, os.replace, then fsync of the folder (the rename itself).
    A full disk raises DiskFullError (naming the file); the temporary file is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise (disk_full_error(path, len(data), err) if is_disk_full(err) else err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path, len(data), err) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable; Windows has no directory fsync
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into memory, then `atomic_write_bytes`: for writers that want a file object (PIL's
    `image.save(f, format=...)`). Previews and frames are small, so the bytes are held in memory once."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(path, buffer.getvalue())
