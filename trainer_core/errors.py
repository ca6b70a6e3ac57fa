"""What every error of the pack shares: a clean type name in ComfyUI's error report, and user values quoted at a
readable length.

ComfyUI imports a custom node pack under a module name that is its folder's path, and its error report shows
`module + "." + qualname` of the exception type unless the module is `builtins`. Without `pack_error` the artist
would read `/home/me/ComfyUI/custom_nodes/klein_lora_lab.trainer_core.album.dataset.DatasetError`; with it,
`DatasetError` (tracebacks print it the same way). The classes are never pickled, so the module name is only shown.
"""

from __future__ import annotations

import math
from typing import TypeVar

E = TypeVar("E", bound=type[BaseException])

MAX_SHOWN = 120  # characters of a user value quoted in a message


def pack_error(cls: E) -> E:
    """Class decorator: the error's type shows as its bare name in ComfyUI's report and in tracebacks."""
    cls.__module__ = "builtins"
    return cls


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`repr(value)` cut to `limit` characters (head … tail, with the full length), for quoting a user value in an
    error: a pasted 2 MB text must not come back as a 2 MB message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 24]}…{text[-16:]}{length}"


def check_number(value: object, what: str, lo: float, hi: float, fix: str = "") -> float:
    """`value` as a float when it is a finite number in [lo, hi]; else ValueError naming it, the range and the fix.

    ComfyUI checks a widget's min/max, but NaN passes that check (every comparison with NaN is false) and text
    widgets or the /prompt route can carry any number, so the pack checks again where a number is used."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}={shown(value)} is not a number. Fix: {fix or f'use a number in [{lo:g}, {hi:g}]'}.")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        kind = "not a finite number" if not math.isfinite(number) else "out of range"
        raise ValueError(
            f"{what}={shown(value)} is {kind}: it must lie in [{lo:g}, {hi:g}]. "
            f"Fix: {fix or f'use a number in [{lo:g}, {hi:g}]'}."
        )
    return number
