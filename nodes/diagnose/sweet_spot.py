"""Klein Sweet Spot: which checkpoint at which scale, from a run's diagnostics and validation loss.

Reads `<run>/diagnostics.json` (from Klein Diagnose Run) and the val_loss of `<run>/metrics.jsonl`, and returns
the suggestion in plain words, the chart of every curve it used with the pick marked, and the suggested LoRA
name and scale, ready for a LoRA loader (trainer_core/analysis/sweet_spot.py holds the rule).
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.sweet_spot import DIAGNOSTICS_FILE, read_diagnostics, render_sweet_spot, suggest
from ...trainer_core.runs.runfolder import checkpoint_step
from ..comfy.paths import folder_fingerprint, lora_list_name, runs_dir
from ..comfy.runs import open_existing_run, runs_with_settings
from ..comfy.widgets import run_combo


class KleinLabSweetSpot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabSweetSpot",
            display_name="Klein Sweet Spot",
            category="Klein LoRA Lab/diagnostics",
            description=(
                "Suggests the checkpoint and scale at peak concept strength before memorisation or collapse, from "
                "the run's diagnostics and validation loss; says why in the clinic's words and charts the curves."
            ),
            inputs=[
                run_combo(
                    runs_with_settings(),
                    "A run of output/klein_lora_lab/runs (diagnose it first for the prompt tests).",
                ),
                io.Int.Input("width", default=960, min=400, max=4096, tooltip="Chart width in pixels."),
                io.Int.Input("height", default=400, min=160, max=4096, tooltip="Chart height in pixels."),
                io.String.Input(
                    "after",
                    optional=True,
                    force_input=True,
                    tooltip="Optional: connect Klein Diagnose Run's report so this node runs after the diagnosis "
                    "in the same queue (only the order matters; the text is not read).",
                ),
            ],
            outputs=[
                io.String.Output(display_name="suggestion", tooltip="The pick and the reasons in plain words."),
                io.Image.Output(display_name="chart", tooltip="Every curve the pick used, with the pick marked."),
                io.String.Output(
                    display_name="lora_name", tooltip="The suggested checkpoint as the loras list shows it."
                ),
                io.Float.Output(display_name="scale", tooltip="The suggested LoRA scale (strength)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, run: str, **kwargs) -> str:
        # New diagnostics, metrics or checkpoints give a new suggestion; otherwise ComfyUI's cached one is reused.
        folder = runs_dir() / run
        return folder_fingerprint(folder, folder / "checkpoints")

    @classmethod
    def execute(cls, run: str, width: int, height: int, after: str | None = None) -> io.NodeOutput:
        folder = open_existing_run(run)
        diagnostics = read_diagnostics(folder.path)
        steps = [checkpoint_step(p) for p in folder.checkpoints()]
        spot = suggest(diagnostics["records"] if diagnostics else [], folder.read_metrics(), steps)
        if spot.step not in steps:
            raise ValueError(
                f"run '{run}': the suggested step {spot.step} has no checkpoint any more; run Klein Diagnose Run "
                f"again (it rewrites {DIAGNOSTICS_FILE}) or restore the checkpoint."
            )
        lora_name = lora_list_name(folder.checkpoint_path(spot.step))
        text = spot.text() + f"\nLoRA: {lora_name} at strength {spot.scale:g}"
        chart = to_image_tensor(render_sweet_spot(spot, width, height, title=folder.path.name))
        return io.NodeOutput(
            text, chart, lora_name, spot.scale, ui={"text": [text], **ui.PreviewImage(chart, cls=cls).as_dict()}
        )


NODES = [KleinLabSweetSpot]
