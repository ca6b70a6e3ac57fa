"""Klein Sweep Curves: the loss curves of every run of a sweep on one chart, and a reading of the sweep in words
(per run: its sweet spot, memorisation or timidity from its diagnostics, else its validation loss)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.sweep_reading import evidence_of, read_sweep, render_sweep_curves
from ..comfy.paths import folder_fingerprint
from ..comfy.sweeps import SWEEP, sweep_runs


class KleinLabSweepCurves(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabSweepCurves",
            display_name="Klein Sweep Curves",
            category="Klein LoRA Lab/diagnostics",
            description=(
                "Every run of a sweep on one loss chart (smoothed loss, validation loss), and the sweep read in "
                "words: which value memorised, which stayed timid, where the sweet spot is. Diagnose the runs "
                "first for the bicycle test; without it the reading uses the validation loss."
            ),
            inputs=[
                SWEEP.Input("sweep", tooltip="From 'Klein Sweep' or 'Klein Load Sweep'."),
                io.Int.Input("width", default=960, min=300, max=4096, tooltip="Chart width in pixels."),
                io.Int.Input("height", default=480, min=160, max=4096, tooltip="Chart height in pixels."),
                io.Float.Input(
                    "smoothing",
                    default=0.9,
                    min=0.0,
                    max=0.999,
                    step=0.01,
                    tooltip="EMA factor of the training-loss curves: 0 = raw, 0.9 ≈ the last 10 steps.",
                ),
                io.String.Input(
                    "after",
                    optional=True,
                    force_input=True,
                    tooltip="Optional: connect a Diagnose Run report so this node reads the sweep after the "
                    "diagnosis in the same queue (only the order matters).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="chart", tooltip="Every run's loss on one chart, one colour per run."),
                io.String.Output(display_name="reading", tooltip="One line per run, then the comparison."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, sweep, **kwargs) -> str:
        # New metrics, checkpoints or diagnostics give a new reading; otherwise the cached one is reused.
        folders = sweep_runs(sweep)
        return folder_fingerprint(*folders, *(f / "checkpoints" for f in folders))

    @classmethod
    def execute(cls, sweep, width: int, height: int, smoothing: float, after: str | None = None) -> io.NodeOutput:
        runs = [evidence_of(label, folder) for label, folder in zip(sweep.labels, sweep_runs(sweep), strict=True)]
        chart = to_image_tensor(render_sweep_curves(runs, width, height, smoothing, f"sweep {sweep.name}"))
        reading = "\n".join(read_sweep(sweep.knob, runs))
        return io.NodeOutput(chart, reading, ui={**ui.PreviewImage(chart, cls=cls).as_dict(), "text": [reading]})


NODES = [KleinLabSweepCurves]
