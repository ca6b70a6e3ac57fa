"""Training callbacks the tests share."""

from __future__ import annotations

from klein_lora_lab.trainer_core.training.trainer import TrainCallbacks


class StopAt(TrainCallbacks):
    """Asks the run to stop after step `step` (as Cancel does): the checkpoint of that step is kept, resumable."""

    def __init__(self, step: int) -> None:
        self.stop_step, self.current = step, 0

    def on_step(self, step: int, total: int, loss: float, lr: float, seconds: float) -> None:
        self.current = step

    def should_stop(self) -> bool:
        return self.current == self.stop_step
