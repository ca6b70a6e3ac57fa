"""A sweep inside ComfyUI: one run per value, each trained through the Train node's own path (`train_in_comfy`),
in sequence on the loaded MODEL; the sweep's socket type; the runs of a sweep as folders.

Queueing a sweep again continues it: finished runs are skipped, a partial run resumes from its last checkpoint,
missing runs start. Cancel keeps every finished run and the checkpoint of the run in progress (the Train node's
rule), and the manifest `<runs>/<sweep>.sweep.json` is rewritten after every run.

With `devices` (e.g. cuda:0, cuda:1) the runs go one per device instead, in worker processes that load the
MODEL's file again (worker_model.py) and train through the same `train(...)`; the node shows one line per
worker and one bar for the whole sweep; Cancel stops every worker at its next step, each keeping its checkpoint.
Workers render no previews (scrub the sweep afterwards).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from comfy_api.latest import io

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.files.safe_paths import child_path
from ...trainer_core.runs.runfolder import RunFolder
from ...trainer_core.runs.sweep import (
    FINISHED,
    PARTIAL,
    PRESET_KNOB,
    Sweep,
    SweepPlan,
    check_existing,
    manifest_path,
    parse_values,
    plan_sweep,
    read_manifest,
    statuses,
    value_text,
    write_manifest,
)
from ...trainer_core.training.options import with_default_options
from ...trainer_core.training.trainer import RESUMABLE_CHANGES
from ...trainer_core.training.workers import RunJob, train_runs_on_devices
from .feedback import WorkersProgress, prompt_server, send_event
from .interrupt import interrupt_requested
from .paths import register_runs_folder
from .train_setup import new_or_resumed_run, sample_config, settings_from_widgets
from .training import TrainOutcome, train_in_comfy
from .worker_model import model_source

LOG = logging.getLogger("klein_lora_lab")
SWEEP = io.Custom("KLEIN_SWEEP")
EVENT_SWEEP_RUN = "klein_lab.sweep.run"  # {sweep, index, total, run, label, status}: which run of a sweep trains


def sweep_plan(name: str, knob: str, values: str, preset_name: str, widgets: dict) -> SweepPlan:
    """The plan from the node's widgets: each run is what the Train node would train with the same widgets and
    the knob set to its value (the preset knob picks the preset instead)."""
    parsed = parse_values(knob, values)
    if knob == PRESET_KNOB:
        return plan_sweep(name, knob, parsed, lambda v: with_default_options(settings_from_widgets(v, **widgets)))
    return plan_sweep(
        name,
        knob,
        parsed,
        lambda v: with_default_options(settings_from_widgets(preset_name, **{**widgets, knob: v}), keep=(knob,)),
    )


def sweep_runs(sweep: Sweep) -> list[Path]:
    """The run folders of a sweep, in its order (inside the runs folder; a symlink leading out is refused)."""
    root = register_runs_folder()
    return [child_path(root, name, what="sweep run") for name in sweep.runs]


def load_sweep(name: str) -> Sweep:
    """The sweep of that name from its manifest in the runs folder."""
    return Sweep.from_manifest(read_manifest(register_runs_folder(), name.strip()))


def manifest_fingerprint(name: str) -> str:
    path = manifest_path(register_runs_folder(), name.strip())
    return f"{path.stat().st_mtime_ns}:{path.stat().st_size}" if path.is_file() else "missing"


def _say(node_id: str | None, text: str) -> None:
    LOG.info("Klein LoRA Lab: %s", text)
    server = prompt_server()
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id, server.client_id)


def panel_sweep(plan: SweepPlan, index: int) -> dict:
    """What the training panel shows of run `index` of the sweep: "run 2 of 3: learning_rate 5e-05"."""
    value = value_text(plan.runs[index].value)
    total = len(plan.runs)
    return {
        "name": plan.name,
        "index": index,
        "total": total,
        "knob": plan.knob,
        "value": value,
        "text": f"run {index + 1} of {total}: {plan.knob} {value}",
    }


@dataclass
class SweepOutcome:
    sweep: Sweep
    trained: list[TrainOutcome]  # the runs trained (or resumed) by this call, in order
    interrupted: bool
    last_checkpoint: Path | None  # of the sweep's last run
    message: str


def train_sweep(
    model_patcher,
    encoded: EncodedDataset,
    plan: SweepPlan,
    sample_steps: int,
    sample_cfg: float,
    node_id: str | None,
    vae=None,
    devices: list[str] | None = None,
) -> SweepOutcome:
    """Train every unfinished run of `plan` in order, or spread over `devices` (see the module doc). Stops at
    the first Cancel; the caller reports the message and raises the interruption."""
    root = register_runs_folder()
    check_existing(root, plan, RESUMABLE_CHANGES)
    state = statuses(root, plan)
    write_manifest(root, plan, state)
    if devices:
        return _train_on_devices(model_patcher, encoded, plan, state, node_id, devices)
    trained: list[TrainOutcome] = []
    total = len(plan.runs)
    for run_plan in plan.runs:
        i = run_plan.index
        if state[i] == FINISHED:
            continue
        resume = state[i] == PARTIAL
        run = new_or_resumed_run(run_plan.name, run_plan.settings, encoded, resume)
        settings = run_plan.settings
        if resume:  # as the Train node: a resumed run keeps its own held-out share
            settings = replace(settings, validation_holdout=run.settings.validation_holdout)
        verb = "resuming" if resume else "training"
        _say(node_id, f"sweep '{plan.name}': {verb} run {i + 1}/{total}, {run_plan.label} ({run_plan.name})")
        event = {"sweep": plan.name, "index": i, "total": total, "run": run_plan.name, "label": run_plan.label}
        send_event(EVENT_SWEEP_RUN, {**event, "status": verb})
        samples = sample_config(encoded, sample_steps, sample_cfg, settings.seed)
        outcome = train_in_comfy(
            model_patcher,
            encoded.items,
            settings,
            run,
            resume,
            node_id,
            samples,
            encoded.empty_context,
            vae,
            sweep=panel_sweep(plan, i),
        )
        trained.append(outcome)
        state = statuses(root, plan)
        write_manifest(root, plan, state)
        if outcome.interrupted:
            message = (
                f"Sweep '{plan.name}' cancelled in run {i + 1}/{total} ({run_plan.label}): "
                f"{sum(s == FINISHED for s in state)} runs finished, this one kept. {outcome.message} "
                "Queue the sweep again to continue it."
            )
            _say(node_id, message)
            return SweepOutcome(Sweep.of(plan), trained, True, None, message)
    last = RunFolder.open(root / plan.runs[-1].name).latest_checkpoint()
    done = ", ".join(r.label for r in plan.runs)
    message = f"Sweep '{plan.name}' finished: {total} runs of {plan.knob} ({done}); {len(trained)} trained now."
    _say(node_id, message)
    return SweepOutcome(Sweep.of(plan), trained, False, last, message)


def _train_on_devices(
    model_patcher, encoded: EncodedDataset, plan: SweepPlan, state: list[str], node_id: str | None, devices: list[str]
) -> SweepOutcome:
    """The unfinished runs of `plan`, one per device in worker processes (train_runs_on_devices)."""
    import comfy.model_management as mm

    root = register_runs_folder()
    source = model_source(model_patcher)  # refused before any folder is touched when workers cannot rebuild it
    jobs, runs = [], {}
    for run_plan in plan.runs:
        if state[run_plan.index] == FINISHED:
            continue
        resume = state[run_plan.index] == PARTIAL
        run = new_or_resumed_run(run_plan.name, run_plan.settings, encoded, resume)
        settings = run_plan.settings
        if resume:  # as the Train node: a resumed run keeps its own held-out share
            settings = replace(settings, validation_holdout=run.settings.validation_holdout)
        jobs.append(RunJob(run_plan.index, run.path, settings, resume))
        runs[run_plan.index] = run
    total = len(plan.runs)
    _say(node_id, f"sweep '{plan.name}': {len(jobs)} run(s) of {total} on {', '.join(devices)}")
    mm.unload_all_models()  # a worker on this process's GPU needs the memory of the MODEL held here
    mm.soft_empty_cache()
    progress = WorkersProgress(node_id, {job.key: (plan.runs[job.key].label, job.settings.steps) for job in jobs})
    resumed = {job.key: job.resume for job in jobs}

    def on_event(event: tuple) -> None:
        progress.event(event)
        if event[0] in ("started", "done"):
            run_plan = plan.runs[event[1]]
            verb = "resuming" if resumed[event[1]] else "training"
            status = verb if event[0] == "started" else ("stopped" if event[4] else "finished")
            data = {"sweep": plan.name, "index": event[1], "total": total, "run": run_plan.name}
            send_event(EVENT_SWEEP_RUN, {**data, "label": run_plan.label, "status": status, "device": event[2]})

    done = []
    cancelled = False
    try:
        done = train_runs_on_devices(
            jobs, devices, source, encoded.items, encoded.empty_context, on_event, interrupt_requested
        )
    except mm.InterruptProcessingException:
        cancelled = True  # ComfyUI's progress hook saw Cancel first; the workers were stopped and kept all the same
    finally:  # the manifest says what is on disk, also after a failed worker
        state = statuses(root, plan)
        write_manifest(root, plan, state)
    interrupted = cancelled or any(d.stopped_early for d in done) or len(done) < len(jobs)
    for job in jobs if interrupted else ():
        run = RunFolder.open(job.path)
        if run.meta.get("status") == "stopped":  # as the Train node: run.json says the artist cancelled it
            run.update(status="interrupted")
    trained = [
        TrainOutcome(runs[d.key], None, d.last_checkpoint, [], interrupted, progress.line(d.key), "finished")
        for d in done
    ]
    finished = sum(s == FINISHED for s in state)
    if interrupted:
        message = (
            f"Sweep '{plan.name}' cancelled on {len(devices)} devices: {finished} of {total} runs finished, the "
            "others kept at their last step. Queue the sweep again to continue it."
        )
        _say(node_id, message)
        return SweepOutcome(Sweep.of(plan), trained, True, None, message)
    last = RunFolder.open(root / plan.runs[-1].name).latest_checkpoint()
    message = (
        f"Sweep '{plan.name}' finished: {total} runs of {plan.knob} ({', '.join(r.label for r in plan.runs)}); "
        f"{len(done)} trained now on {', '.join(devices)}."
    )
    _say(node_id, message)
    return SweepOutcome(Sweep.of(plan), trained, False, last, message)
