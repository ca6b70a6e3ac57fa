"""Fork server for the kill loop (tests/unit/test_kill_loop.py): trains the tiny Klein and gets SIGKILLed.

Started once per test (torch is imported once); then, for every line `<run_dir> <delay_seconds>` on stdin, it
forks a child that creates or resumes the run in `run_dir` and trains it to the end. When `delay_seconds` >= 0
the child receives SIGKILL that many seconds after the fork; the answer line is `killed`, or `exit <code>` when
the child ended first. A negative delay lets the child finish (the uninterrupted reference run).

The child makes writes slow so that kills land inside them: `fsync` sleeps, every file written through
`os.fdopen` (atomic_write_bytes' temporary file) is written in two halves with a pause between them, and every
metrics.jsonl line is written in two halves too (a kill there leaves a torn last line). Only this process is
patched; the code under test runs unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.pack import register_pack  # noqa: E402

register_pack()

from klein_lora_lab.trainer_core.model.tiny import TinySpec, tiny_klein  # noqa: E402
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder  # noqa: E402
from klein_lora_lab.trainer_core.training.data import TrainItem  # noqa: E402
from klein_lora_lab.trainer_core.training.settings import TrainSettings  # noqa: E402
from klein_lora_lab.trainer_core.training.trainer import train  # noqa: E402

SPEC = TinySpec(hidden=128, double_blocks=1, single_blocks=1, context_dim=16)
SETTINGS = TrainSettings(
    rank=4,
    alpha=4,
    learning_rate=1e-3,
    steps=8,
    checkpoint_every=2,
    save_dtype="fp32",
    mixed_precision="fp32",
    gradient_checkpointing=False,
    compile_blocks="off",
)
PAUSE = 0.008  # seconds of every slowed write stage


def items() -> list[TrainItem]:
    g = torch.Generator().manual_seed(11)
    return [
        TrainItem(torch.randn(128, 2, 2, generator=g), torch.randn(3, 16, generator=g), (), name=f"img{i}")
        for i in range(3)
    ]


class _HalvedFile:
    """A binary file whose write() stores the first half, pauses, then the rest (so a kill can tear it)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        half = len(data) // 2
        self._f.write(data[:half])
        self._f.flush()
        time.sleep(PAUSE)
        return half + self._f.write(data[half:])

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.__exit__(*exc)


def _slow_writes() -> None:
    real_fdopen, real_write = os.fdopen, os.write

    def fdopen(*args, **kwargs):
        return _HalvedFile(real_fdopen(*args, **kwargs))

    def write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.endswith("metrics.jsonl") or len(data) < 2:
            return real_write(fd, data)
        half = len(data) // 2
        real_write(fd, data[:half])
        time.sleep(PAUSE)
        return half + real_write(fd, data[half:])

    os.fdopen = fdopen
    os.write = write
    os.fsync = lambda fd: time.sleep(PAUSE)  # slow storage; SIGKILL durability does not depend on fsync


def child(run_dir: Path) -> None:
    torch.set_num_threads(1)
    _slow_writes()
    if (run_dir / "run.json").is_file():
        run, resume = RunFolder.open(run_dir), True
    else:
        run, resume = RunFolder.create(run_dir, SETTINGS, {"trigger": "TOK"}), False
    train(tiny_klein(SPEC), items(), SETTINGS, run, resume=resume)


def warm_up() -> None:
    """Import what the first training step imports lazily (the optimizer pulls in torch._dynamo, seconds), once
    here instead of in every child. No tensor math runs before the fork (thread pools are not fork-safe)."""
    torch.set_num_threads(1)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def serve() -> None:
    warm_up()
    for line in sys.stdin:
        run_dir, delay = line.rsplit(" ", 1)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(Path(run_dir))
            except BaseException:  # noqa: BLE001 - report any failure of the child to the test, then exit
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + float(delay) if float(delay) >= 0 else None
        answer = None
        while answer is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                answer = f"exit {os.waitstatus_to_exitcode(status)}"
            elif deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                answer = "killed"
            else:
                time.sleep(0.0005)
        print(answer, flush=True)


if __name__ == "__main__":
    serve()
