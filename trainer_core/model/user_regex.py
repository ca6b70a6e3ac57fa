"""Regular expressions typed by a user (the `regex:` target spec), matched in linear time.

Python's `re` backtracks: `(.*.*)*X` against a module name takes exponential time, and since a node runs on
ComfyUI's execution thread while holding the GIL, one such pattern stalls the whole server (`/queue` and
`/interrupt` stop answering). A complexity check on `re` patterns cannot be complete (`(a|a)*`, `.*.*.*.*X` and
many other shapes backtrack without nesting quantifiers), so user patterns run on RE2 (google-re2, wheels for
CPython 3.10-3.14 on Linux x86_64/aarch64, macOS and Windows): matching is linear in the text, and the pattern's
compiled size is capped. RE2 has no backreferences or lookaround; a pattern using them is refused with that
reason. The pack's own fixed patterns stay on `re`.
"""

from __future__ import annotations

from typing import Any

from ..errors import shown

MAX_PATTERN_CHARS = 1000  # far above any module-name pattern; longer text is refused before compiling
MAX_PROGRAM_BYTES = 8 << 20  # RE2's memory budget for one compiled pattern (counted repeats like x{1000}{1000})


def compile_user_regex(pattern: str, what: str = "regex") -> Any:
    """The RE2 pattern object for `pattern` (its `fullmatch`/`search` behave like `re`'s, in linear time).

    Raises ValueError naming the (shortened) pattern and the reason: too long, not valid, or a feature RE2 lacks.
    """
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be text, got {type(pattern).__name__}.")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"{what} {shown(pattern)} is longer than {MAX_PATTERN_CHARS} characters: write a shorter pattern "
            "(module names are short; e.g. 'single_blocks\\.(1[0-9])\\..*')."
        )
    try:
        import re2
    except ImportError as err:  # a broken install: never fall back to the backtracking engine
        raise ValueError(
            f"{what} needs the google-re2 package, which is not installed. Fix: pip install google-re2 in "
            "ComfyUI's Python (it is in this pack's requirements.txt), or use a target spec without 'regex:'."
        ) from err
    options = re2.Options()
    options.max_mem = MAX_PROGRAM_BYTES
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as err:
        reason = err.args[0].decode("utf-8", "replace") if err.args and isinstance(err.args[0], bytes) else str(err)
        hint = ""
        if "perl operator" in reason or "escape sequence" in reason:
            hint = " Lookaround ((?=, (?!, (?<=) and backreferences (\\1) are not supported: they make matching slow."
        elif "too big" in reason or "bad repetition" in reason:
            hint = " The pattern is too large to match in bounded time: use smaller repeat counts."
        raise ValueError(f"{what} {shown(pattern)} cannot be used: {reason}.{hint}") from err
