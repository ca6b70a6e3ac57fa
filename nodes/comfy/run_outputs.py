"""Whether a Train node's cached result still stands for files on disk (its `fingerprint_inputs`).

ComfyUI reuses a node's cached output while the node's inputs and fingerprint are unchanged. For the Train node
that output names a run's checkpoint; when the run folder was deleted or its checkpoint replaced by hand, the
cached "Finished ... step_000004.safetensors" would stand for a file that is not there. So each execution records
the checkpoint it reported (size and modification time), and the fingerprint stays the same token while that file
is unchanged (re-queueing a finished prompt answers from the cache, as before) and moves to a new token as soon as
it is missing or changed, so ComfyUI runs the node again. A fingerprint must be the same before and after the
node's own execution, which is why the token is a generation count rather than the folder's contents.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Recorded:
    checkpoint: Path | None
    stat: tuple[int, int] | None  # (size, mtime_ns) of the checkpoint when it was reported
    generation: int


_LOCK = threading.Lock()
_RECORDS: dict[str, _Recorded] = {}  # run name as typed -> what its last execution reported
_GENERATIONS: dict[str, int] = {}


def _stat(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def record_output(run_name: str, run_path: Path, checkpoint: Path | None) -> None:
    """Remember the checkpoint an execution reported for `run_name` (call at the end of a successful execute)."""
    key = run_name.strip()
    with _LOCK:
        generation = _GENERATIONS.get(key, 0)
        target = checkpoint if checkpoint is not None else run_path / "run.json"
        _RECORDS[key] = _Recorded(target, _stat(target), generation)


def output_fingerprint(run_name: str) -> str:
    """A token that changes when the files behind the last reported result of `run_name` vanished or changed."""
    key = str(run_name).strip()
    with _LOCK:
        generation = _GENERATIONS.get(key, 0)
        recorded = _RECORDS.get(key)
        if recorded is not None and recorded.generation == generation and _stat(recorded.checkpoint) != recorded.stat:
            generation += 1  # the run folder changed or vanished: the cached result no longer holds
            _GENERATIONS[key] = generation
            del _RECORDS[key]
        return f"run-output-{generation}"
