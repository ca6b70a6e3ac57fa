"""The scrub of a sweep: runs × checkpoints × scales × prompts on the loaded model, with a run axis.

Planning is trainer_core.analysis.scrub.sweep_frame_plan (frame order run → step → scale → prompt, labels naming
knob=value). Rendering reuses the scrub's pipeline (nodes/comfy/render.py): each distinct (checkpoint, scale,
prompt) is sampled once — a shorter run of a steps sweep shows its last checkpoint at later steps without
rendering it again — then the frames are gathered in plan order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import torch
from comfy_api.latest import io

from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.scrub import (
    SEP,
    Checkpoint,
    ScrubError,
    SweepFrame,
    SweepRunCheckpoints,
    compose_grid,
    fmt_scale,
    inputs_key,
    parse_scales,
    select_checkpoints,
    sweep_axes,
    sweep_frame_plan,
    sweep_steps,
)
from ...trainer_core.runs.runfolder import RunFolder, checkpoint_step
from ...trainer_core.runs.sweep import Sweep
from .forward_loras import StackItem, apply_items
from .identities import conditioning_identity, file_identity, model_identity
from .images import tensor_to_pil
from .paths import folder_fingerprint, lora_list_name
from .render import SCRUB_UI_KEY, RenderSettings, decode_frames, render_frames, scrub_folder, write_scrub_output
from .scrub import grid_prompts
from .sweeps import sweep_runs

LOG = logging.getLogger("klein_lora_lab")


def sweep_checkpoints(sweep: Sweep, selection: str) -> list[SweepRunCheckpoints]:
    """Per run of the sweep (in its order): the selected checkpoints as names of ComfyUI's loras list."""
    out = []
    for label, folder in zip(sweep.labels, sweep_runs(sweep), strict=True):
        if not (folder / "run.json").is_file():
            raise ScrubError(f"run '{folder.name}' of sweep '{sweep.name}' has not started: queue the sweep.")
        files = {checkpoint_step(p): p for p in RunFolder.open(folder).checkpoints()}
        if not files:
            raise ScrubError(f"run '{folder.name}' of sweep '{sweep.name}' has no checkpoint yet: queue the sweep.")
        try:
            steps = select_checkpoints(selection, sorted(files))
        except ScrubError as err:
            raise ScrubError(f"run '{folder.name}' ({label}): {err}") from err
        ckpts = tuple(Checkpoint(lora_list_name(files[s]), s) for s in steps)
        out.append(SweepRunCheckpoints(label, folder.name, ckpts))
    return out


def sweep_fingerprint(sweep: Sweep) -> str:
    """Changes when any run of the sweep gets a new or re-trained checkpoint."""
    return folder_fingerprint(*(folder / "checkpoints" for folder in sweep_runs(sweep)))


def render_sweep(
    model, vae, frames: list[SweepFrame], positives: list, negative, settings: RenderSettings, preset: str
):
    """IMAGE [len(frames), H, W, 3] in plan order, each distinct (checkpoint, scale, prompt) sampled once."""
    unique: dict[tuple, int] = {}
    for f in frames:
        unique.setdefault((f.lora, f.scale, f.prompt_index), len(unique))

    def jobs():
        patched_for: tuple | None = None
        patched = None
        for lora, scale, p in unique:
            if patched_for != (lora, scale):  # a clone of the SAME input model with this one LoRA at forward time
                patched, _report = apply_items(model, [StackItem(lora, scale, preset)])
                patched_for = (lora, scale)
            yield patched, positives[p]

    samples, times = render_frames(jobs(), negative, settings, len(unique))
    images = decode_frames(vae, samples, times)
    order = torch.tensor([unique[(f.lora, f.scale, f.prompt_index)] for f in frames])
    return images[order], times


def sweep_grid(pil, frames: list[SweepFrame], runs: list[SweepRunCheckpoints], scales, texts, title: str):
    """One row per (run, step), one column per (scale, prompt): reading row by row follows the frame order."""
    if len(texts) > 1:
        col_headers = [f"scale {fmt_scale(s)}{SEP}prompt {p + 1}" for s in scales for p in range(len(texts))]
    else:
        col_headers = [f"scale {fmt_scale(s)}" for s in scales]
        title = f"{title}{SEP}{texts[0]}"
    # The title names the knob, so rows and cells show only its value: "5e-05 · step 800" fits a cell's width.
    value = {r.label: r.label.split("=", 1)[-1] for r in runs}
    rows = [f"{value[r.label]}{SEP}step {s}" for r in runs for s in sweep_steps(runs)]
    cells = [value[f.run_label] + f.label[len(f.run_label) :] for f in frames]
    return compose_grid(pil, len(col_headers), cells, rows, col_headers, title)


def scrub_sweep(
    model,
    vae,
    sweep: Sweep,
    checkpoints: str,
    scales: str,
    prompts: str,
    settings: RenderSettings,
    preset: str,
    clip,
    positive,
    negative,
) -> io.NodeOutput:
    """The scrub node's outputs for every run of a sweep: frames run → step → scale → prompt, labels naming
    knob=value, the grid and the scrubber's UI metadata (the same contract as a one-run scrub)."""
    runs = sweep_checkpoints(sweep, checkpoints)
    scale_values = parse_scales(scales)
    asked = grid_prompts(clip, prompts, positive, negative, settings.cfg)
    frames = sweep_frame_plan(runs, scale_values, asked.texts)  # validates the frame count before any rendering
    key = inputs_key(
        {
            "model": model_identity(model, vae),
            "loras": file_identity(sorted({f.lora for f in frames})),
            "runs": list(sweep.runs),
            "scales": scale_values,
            "prompts": asked.texts,
            "positive": conditioning_identity(positive),
            "negative": conditioning_identity(negative),
            "settings": asdict(settings),
            "preset": preset,
        }
    )
    images, times = render_sweep(model, vae, frames, asked.positives, asked.negative, settings, preset)
    LOG.info("Klein LoRA Lab: scrub of sweep %s: %s", sweep.name, times.line())
    pil = tensor_to_pil(images)
    title = f"sweep {sweep.name} ({sweep.knob}){SEP}seed {settings.seed}{SEP}{settings.steps} steps"
    grid = sweep_grid(pil, frames, runs, scale_values, asked.texts, title)
    axes = sweep_axes(runs, scale_values, asked.texts)
    folder = scrub_folder(f"sweep-{sweep.name}", key)
    meta = write_scrub_output("KleinLabScrubRun", folder, axes, [(f.coords, f.label) for f in frames], pil, grid)
    labels = json.dumps([f.record() for f in frames], ensure_ascii=False)
    return io.NodeOutput(images, to_image_tensor(grid), labels, ui={SCRUB_UI_KEY: [meta]})
