"""SIGKILL during training and during checkpoint writes, many times: nothing visible is ever torn, resume finishes
with exactly the weights and losses of a run that was never killed.

A fork server (tests/harness/kill_worker.py) imports torch once and forks one child per attempt; each child
creates or resumes a tiny-Klein run (checkpoints every 2 steps, writes slowed so kills land inside them) and is
SIGKILLed after a seeded random delay. After every kill the run folder is inspected as a user (or ComfyUI's
loras list) would see it; once a run reaches its last step its final LoRA and loss curve are compared with an
uninterrupted reference run.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.lora.lora_file import load_lora
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder, checkpoint_step
from safetensors import safe_open

WORKER = Path(__file__).resolve().parents[1] / "harness" / "kill_worker.py"
KILLS = 60  # at least 50 kills, spread over several runs
MAX_KILLS_PER_RUN = 10  # then the run is let finish, so every run is checked against the reference
SEED = 20261121
_VISIBLE = re.compile(r"^step_\d{6}\.(safetensors|state)$")
_HIDDEN_TMP = re.compile(r"^\..+\.tmp$")

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir(), reason="needs fork and /proc (Linux)"
)


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def attempt(self, run_dir: Path, delay: float) -> str:
        self.proc.stdin.write(f"{run_dir} {delay:.4f}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, "the kill worker died"
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _inspect(run_dir: Path, stats: Counter) -> None:
    """What a kill may leave: only whole files are visible, everything visible loads, metadata parses."""
    if not (run_dir / "run.json").exists():
        stats["before run.json"] += 1
        return
    run = RunFolder.open(run_dir)  # run.json parses
    run.read_metrics()  # every line but a torn last one parses
    if run.metrics_path.is_file() and not run.metrics_path.read_bytes().endswith(b"\n"):
        stats["torn metrics line"] += 1
    names = [p.name for p in run.checkpoints_dir.iterdir()]
    strays = [n for n in names if not _VISIBLE.match(n) and not _HIDDEN_TMP.match(n)]
    assert not strays, f"unexpected files after a kill: {strays}"
    if any(_HIDDEN_TMP.match(n) for n in names + [p.name for p in run_dir.iterdir()]):
        stats["inside a file write"] += 1
    for path in run.checkpoints():
        step = checkpoint_step(path)
        weights, meta = load_lora(path)
        assert meta["klein_lab.step"] == str(step)
        assert all(torch.isfinite(w.up).all() and torch.isfinite(w.down).all() for w in weights.values())
        with safe_open(str(path), framework="pt") as f:
            assert len(list(f.keys())) == 3 * len(weights)
    for state in run.checkpoints_dir.glob("step_*.state"):
        step = int(state.name[5:11])
        tensors, info = run.load_state(step)
        assert info["step"] == step and tensors
        if not run.checkpoint_path(step).exists():
            stats["between state and LoRA file"] += 1


def _final(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    run = RunFolder.open(run_dir)
    assert run.meta["status"] == "finished"
    weights, _ = load_lora(run.latest_checkpoint())
    return {k: torch.cat([w.down.flatten(), w.up.flatten()]) for k, w in weights.items()}, [
        r["loss"] for r in run.read_metrics()
    ]


def test_sigkill_anywhere_loses_nothing(tmp_path: Path) -> None:
    """60 SIGKILLs at seeded random moments of steps, metrics appends and checkpoint writes: after each, every
    visible checkpoint and state file is whole and loads, run.json and metrics.jsonl parse, and resuming ends
    with bit-identical final weights and the same loss of every step as an uninterrupted run."""
    rng = random.Random(SEED)
    worker = Worker()
    stats: Counter = Counter()
    try:
        assert worker.attempt(tmp_path / "reference", -1) == "exit 0"
        reference_weights, reference_losses = _final(tmp_path / "reference")
        assert len(reference_losses) == 8
        kills, runs = 0, 0
        while kills < KILLS:
            run_dir, in_run = tmp_path / f"run{runs}", 0
            runs += 1
            while True:
                delay = rng.uniform(0.0, 0.6) if in_run < MAX_KILLS_PER_RUN else -1
                answer = worker.attempt(run_dir, delay)
                if answer != "killed":
                    assert answer == "exit 0", f"a resumed child failed ({answer}); see its traceback above"
                    break
                kills += 1
                in_run += 1
                _inspect(run_dir, stats)
            weights, losses = _final(run_dir)
            assert losses == reference_losses
            assert weights.keys() == reference_weights.keys()
            assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)
            assert not list(run_dir.rglob(".*.tmp")), "resume leaves no temporary file behind"
    finally:
        worker.close()
    print(
        f"\nkill loop: {kills} kills over {runs} runs, all resumed to the reference; where they landed: {dict(stats)}"
    )
    # The slowed writes take a large share of each child's time, so some kills must land inside them.
    assert stats["inside a file write"] + stats["between state and LoRA file"] + stats["torn metrics line"] >= 5
