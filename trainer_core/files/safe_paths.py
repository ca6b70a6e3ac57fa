"""The one place that turns names and paths typed by a user into paths the pack may read or write.

A ComfyUI server is long-lived and its widgets (and its /prompt route) accept any text, so every run name,
output prefix, album folder or run selection goes through here before it touches the disk:

* `safe_name(text)`: a single new file/folder name (run name, output prefix). No separators, no `.`/`..`, no
  leading dot, no NUL or control characters, no characters Windows forbids, no reserved device names
  (CON, NUL, COM1, ...), at most `MAX_NAME_BYTES` bytes of UTF-8.
* `resolve_inside(text, roots)`: a path (absolute, or relative to a base folder) that must stay inside one of the
  allowed roots *after* every symlink is followed. `..` components are refused outright (even when they would
  stay inside), as are NUL bytes and over-long paths or components.
* `confined_file(path, roots)`: a file found inside an allowed folder (an album's image or caption, a checkpoint)
  whose real location must be inside one of the roots too: a symlink `good.txt -> /etc/passwd` in an album is
  refused, not read.
* `child_path(root, *names)`: `root/name/...` for names already checked, verified to stay inside `root` (a
  symlink planted at `root/name` cannot redirect a write elsewhere).

Every refusal raises `UnsafePathError` (a ValueError) whose message names the value, says what is wrong and
how to fix it. Pure python: no ComfyUI import (the nodes pass ComfyUI's folders in as roots).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import pack_error

MAX_NAME_BYTES = 128  # a name we create; leaves room for suffixes (".state", ".<random>.tmp") under NAME_MAX 255
MAX_COMPONENT_BYTES = 255  # NAME_MAX of common filesystems (ext4, APFS, NTFS in UTF-16 units)
MAX_PATH_BYTES = 1024  # far above any real album path, far below PATH_MAX 4096
_WINDOWS_FORBIDDEN = set('<>:"/\\|?*')
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@pack_error
class UnsafePathError(ValueError):
    """A user-given name or path that could read or write outside the allowed folders (or is not a valid name)."""


def _shown(text: str, limit: int = 80) -> str:
    """The value as it appears in an error: repr (so NUL and control characters are visible), shortened."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[: limit - 20]}…{shown[-16:]} ({len(text)} characters)"


def _check_text(text: object, what: str) -> str:
    """`text` without surrounding whitespace (a pasted path often ends in a newline), checked for NUL and control
    characters."""
    if not isinstance(text, str):
        raise UnsafePathError(f"{what} must be text, got {type(text).__name__}: pass a string.")
    text = text.strip()
    if "\x00" in text:
        raise UnsafePathError(f"{what} {_shown(text)} contains a NUL byte: remove it (no file name can hold one).")
    if _CONTROL.search(text):
        raise UnsafePathError(f"{what} {_shown(text)} contains control characters: type the name again without them.")
    return text


def safe_name(text: str, what: str = "name", max_bytes: int = MAX_NAME_BYTES) -> str:
    """`text` stripped of surrounding spaces, checked to be a single safe file/folder name; returns it."""
    name = _check_text(text, what)
    fix = "use letters, digits, '_', '-' and '.' (e.g. 'tok_style_v1')"
    if not name:
        raise UnsafePathError(f"{what} is empty: {fix}.")
    if name in (".", ".."):
        raise UnsafePathError(f"{what} {_shown(name)} is not a name but a folder reference: {fix}.")
    bad = sorted(set(name) & _WINDOWS_FORBIDDEN)
    if bad:
        raise UnsafePathError(
            f"{what} {_shown(name)} contains {''.join(bad)!r}: a name cannot hold path separators or "
            f"characters Windows forbids; {fix}."
        )
    if name.startswith("."):
        raise UnsafePathError(f"{what} {_shown(name)} starts with '.' (a hidden file): {fix}.")
    if name.endswith("."):
        raise UnsafePathError(f"{what} {_shown(name)} ends with '.' (Windows drops it): {fix}.")
    if name.split(".")[0].strip().upper() in _RESERVED:
        raise UnsafePathError(f"{what} {_shown(name)} is a reserved device name on Windows: {fix}.")
    size = len(name.encode("utf-8"))
    if size > max_bytes:
        raise UnsafePathError(f"{what} {_shown(name)} is {size} bytes long: use at most {max_bytes} bytes.")
    return name


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path) -> Path:
    """The path with every symlink followed (missing trailing parts kept as they are)."""
    return Path(os.path.realpath(path))


def resolve_inside(
    text: str,
    roots: Sequence[str | os.PathLike[str]],
    what: str = "path",
    base: str | os.PathLike[str] | None = None,
) -> Path:
    """The real path (symlinks followed) of `text`, which must lie inside one of `roots`.

    `text` may be absolute or relative to `base` (default: the first root); surrounding spaces and quotes (as a
    pasted path has) are dropped and `~` is expanded. Raises UnsafePathError naming the value otherwise.
    """
    if not roots:
        raise UnsafePathError(f"no allowed folders are configured, so {what} cannot be opened.")
    raw = _check_text(text, what).strip('"').strip("'").strip()
    if not raw:
        raise UnsafePathError(f"{what} is empty: give a folder inside {Path(base or roots[0])}.")
    if len(raw.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"{what} {_shown(raw)} is longer than {MAX_PATH_BYTES} bytes: use a shorter path.")
    parts = re.split(r"[\\/]", raw)
    if ".." in parts:
        raise UnsafePathError(
            f"{what} {_shown(raw)} contains '..': give the folder directly (relative to "
            f"{Path(base or roots[0])}, or an absolute path inside an allowed folder)."
        )
    long = [p for p in parts if len(p.encode("utf-8")) > MAX_COMPONENT_BYTES]
    if long:
        raise UnsafePathError(
            f"{what} {_shown(raw)} has a part of {len(long[0].encode('utf-8'))} bytes: "
            f"file systems allow at most {MAX_COMPONENT_BYTES}; rename it."
        )
    path = Path(raw).expanduser()
    candidate = path if path.is_absolute() else Path(base if base is not None else roots[0]) / path
    real = _real(candidate)
    real_roots = [_real(Path(r)) for r in roots]
    if any(_inside(real, r) for r in real_roots):
        return real
    via = f" (a symlink leads to {real})" if real != Path(os.path.abspath(candidate)) else ""
    allowed = ", ".join(str(r) for r in dict.fromkeys(real_roots))
    raise UnsafePathError(
        f"{what} {_shown(raw)} is outside the folders this pack may use{via}. Fix: put it inside one of {allowed}, "
        "or add its folder to ComfyUI's extra_model_paths.yaml."
    )


def child_path(root: str | os.PathLike[str], *names: str, what: str = "name") -> Path:
    """`root/names...` for names that pass `safe_name`, verified to stay inside `root` once symlinks are followed."""
    root = Path(root)
    path = root.joinpath(*(safe_name(n, what, MAX_COMPONENT_BYTES) for n in names))
    real, real_root = _real(path), _real(root)
    if not _inside(real, real_root) or real == real_root:
        raise UnsafePathError(
            f"{what} {_shown('/'.join(names))} leads outside {root} (a symlink points to {real}): remove that "
            "link or choose another name."
        )
    return path


def confined_file(path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]], what: str = "file") -> Path:
    """`path` (a file found in a folder the pack may read) when its real location, every symlink followed, lies
    inside one of `roots`; UnsafePathError naming the file and the fix otherwise. Returns the path as given."""
    path = Path(path)
    real = _real(path)
    if any(_inside(real, _real(Path(r))) for r in roots):
        return path
    raise UnsafePathError(
        f"{what} {_shown(str(path))} is a link to {_shown(str(real))}, outside the folders this pack may use, so "
        "it is not read. Fix: copy the file itself into the folder instead of linking it (or add the folder it "
        "lives in to ComfyUI's extra_model_paths.yaml)."
    )
