"""One Train-node run spread over several devices (trainer_core/training/distributed.py): one process per device,
each loading the MODEL's file again (worker_model.py), the node's bar and text fed by rank 0, Cancel through the
shared stop event. The batch_size widget is the batch of each device: the run trains with batch × devices, and
run.json records that effective batch (the run can be resumed alone or on as many devices).

No previews, live panel or sweet-spot stop while the ranks train (they live in other processes): scrub the run's
checkpoints afterwards.
"""

from __future__ import annotations

from dataclasses import replace

import comfy.model_management as mm
from torch import Tensor

from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ...trainer_core.training.distributed import train_data_parallel
from ...trainer_core.training.settings import SettingsError, TrainSettings
from ...trainer_core.training.spawn import RunDone
from .feedback import LiveProgress
from .interrupt import interrupt_requested
from .worker_model import model_source


def data_parallel_settings(settings: TrainSettings, devices: list[str]) -> TrainSettings:
    """The run's settings on `devices`: batch_size (per device) × devices; unchanged without devices."""
    if not devices:
        return settings
    if len(devices) < 2:
        raise SettingsError(
            f"devices {devices}: one run spreads over two devices or more; leave devices empty to train on the "
            "MODEL's device."
        )
    return replace(settings, batch_size=settings.batch_size * len(devices))


def train_on_devices(
    model_patcher, items, settings: TrainSettings, run: RunFolder, resume: bool, node_id: str | None,
    empty_context: Tensor | None, devices: list[str],
) -> tuple[RunFolder, RunDone | None, bool, str]:  # fmt: skip
    """Train the run data-parallel on `devices`; returns (the run as the ranks left it, rank 0's report (None
    when Cancel came through ComfyUI's progress hook), interrupted, status)."""
    source = model_source(model_patcher)  # refused before any process starts when workers cannot rebuild it
    first = checkpoint_step(run.latest_resumable()) if resume and run.latest_resumable() is not None else 0
    progress = LiveProgress(settings.steps, node_id, run.path.name, first)
    mm.unload_all_models()  # rank 0 may share this process's GPU: free the MODEL held here
    mm.soft_empty_cache()

    def on_event(event: tuple) -> None:
        if event[0] == "step":
            progress.step(event[2], event[4], event[5])

    try:
        done = train_data_parallel(
            source, items, settings, run.path, devices, resume, empty_context, on_event, interrupt_requested
        )
        interrupted = done.stopped_early and interrupt_requested()
    except mm.InterruptProcessingException:  # ComfyUI's progress hook saw Cancel first; the ranks stopped all the same
        done, interrupted = None, True
    run = RunFolder.open(run.path)  # rank 0 rewrote run.json
    status = "cancelled" if interrupted else ("stopped" if done.stopped_early else "finished")
    if interrupted:
        run.update(status="interrupted")
    return run, done, interrupted, status
