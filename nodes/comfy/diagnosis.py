"""A diagnosis pass inside ComfyUI: a run's checkpoints × scales rendered with ComfyUI's sampler (a forward-time
LoRA on a clone of the same input MODEL) and measured by trainer_core/analysis/diagnose.py; and the same pass on
every run of a sweep, followed by the sweep read in words (trainer_core/analysis/sweep_reading.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ...trainer_core.album.latent_cache import EncodedDataset
from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.diagnose import diagnose, diagnosis_plan, record_diagnosis
from ...trainer_core.analysis.sweep_reading import evidence_of, read_sweep
from ...trainer_core.analysis.sweet_spot import render_sweet_spot
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ...trainer_core.runs.sweep import Sweep, SweepError
from .paths import lora_list_name
from .render import RenderSettings, decode_frames, encode_prompts
from .scrub import checkpoint_sampler
from .sweeps import sweep_runs


@dataclass(frozen=True)
class DiagnoseRequest:
    """What every pass of one Diagnose Run node shares: the model, encoders, album, selection and render settings."""

    model: object  # ComfyUI's MODEL (never patched: each checkpoint renders on a clone)
    clip: object
    vae: object
    encoded: EncodedDataset
    checkpoints: str  # 'all', 'last 5', 'every 2', '300-1200', '300,600'
    scales: str
    texts: Mapping[str, str]  # prompt group -> its lines
    settings: RenderSettings


@dataclass(frozen=True)
class DiagnosisOutput:
    text: str
    chart: Tensor  # [n, H, W, 3]: one sweet-spot chart per run
    frames: Tensor  # [frames, h, w, 3]: per run, base frames then checkpoint × scale × prompt


def diagnose_folder(request: DiagnoseRequest, folder: RunFolder, title: str) -> DiagnosisOutput:
    """One diagnosis pass on the run in `folder`, recorded in its diagnostics.json."""
    files = {checkpoint_step(p): p for p in folder.checkpoints()}
    trigger = str(folder.meta.get("trigger", "")) or request.encoded.trigger
    plan = diagnosis_plan(dict(request.texts), trigger, request.checkpoints, sorted(files), request.scales)
    names = {step: lora_list_name(files[step]) for step in plan.steps}
    positives = encode_prompts(request.clip, plan.prompts)
    negative = encode_prompts(request.clip, [""])[0]
    sample = checkpoint_sampler(request.model, positives, negative, request.settings, names)
    album = [item.latent for item in request.encoded.items]
    result = diagnose(plan, sample, lambda latents: decode_frames(request.vae, latents), album, names)
    render = dict(request.settings.__dict__)
    text, spot = record_diagnosis(folder, plan, result, render, request.encoded.dataset_hash)
    chart = to_image_tensor(render_sweet_spot(spot, title=title))
    return DiagnosisOutput(text, chart, result.images)


def diagnose_sweep(request: DiagnoseRequest, sweep: Sweep) -> DiagnosisOutput:
    """The pass on every run of the sweep with checkpoints, in its order, then the sweep-level reading (one line
    per run from its diagnostics, then the comparison). Charts and frames are stacked run after run; a run not
    trained yet is named, not diagnosed."""
    blocks, outputs, evidence = [], [], []
    for label, path in zip(sweep.labels, sweep_runs(sweep), strict=True):
        folder = RunFolder.open(path) if (path / "run.json").is_file() else None
        if folder is None or not folder.checkpoints():
            blocks.append(f"== {label} ({path.name}) ==\nno checkpoint yet: queue the sweep again to train it.")
            continue
        out = diagnose_folder(request, folder, f"{label} ({path.name})")
        blocks.append(f"== {label} ({path.name}) ==\n{out.text}")
        outputs.append(out)
        evidence.append(evidence_of(label, path))
    if not outputs:
        raise SweepError(f"sweep '{sweep.name}': none of its runs has a checkpoint yet. Queue the sweep first.")
    reading = "\n".join(read_sweep(sweep.knob, evidence))
    text = "\n\n".join([*blocks, f"== sweep '{sweep.name}' over {sweep.knob} ==\n{reading}"])
    return DiagnosisOutput(text, torch.cat([o.chart for o in outputs]), torch.cat([o.frames for o in outputs]))
