"""Loss curve of a run folder: training loss, its EMA, validation loss and checkpoint marks, as an IMAGE."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io, ui

from ...trainer_core.analysis.loss_curve import run_loss_curve
from ...trainer_core.analysis.per_image import latest_learning, learning_lines
from ...trainer_core.files.safe_paths import resolve_inside
from ...trainer_core.runs.runfolder import RunFolder
from ..comfy.paths import allowed_roots, folder_fingerprint, runs_dir


def resolve_run(run: str) -> Path:
    """A run as typed: a run name under <output>/klein_lora_lab/runs, or an absolute path to a run folder inside
    an allowed folder (safe_paths refuses '..', NUL bytes and symlinks out of those folders)."""
    return resolve_inside(run, allowed_roots(), "run", base=runs_dir())


class KleinLabLossCurve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabLossCurve",
            display_name="Klein Loss Curve",
            category="Klein LoRA Lab/train",
            description=(
                "Draws a run's loss curve: raw loss, smoothed loss, validation loss and checkpoint marks; lists "
                "the album items the LoRA learns least and most (per-image loss, measured at each validation)."
            ),
            inputs=[
                io.String.Input(
                    "run",
                    default="klein_lora",
                    tooltip="Run name (a folder of output/klein_lora_lab/runs) or the absolute path of a run folder.",
                ),
                io.Int.Input("width", default=768, min=200, max=4096, tooltip="Picture width in pixels."),
                io.Int.Input("height", default=384, min=120, max=4096, tooltip="Picture height in pixels."),
                io.Float.Input(
                    "smoothing",
                    default=0.9,
                    min=0.0,
                    max=0.999,
                    step=0.01,
                    tooltip="EMA factor of the smoothed curve: 0 = raw, 0.9 ≈ the last 10 steps, 0.99 ≈ the last 100.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="loss_curve"),
                io.String.Output(
                    display_name="per_image",
                    tooltip="The items learned least (outliers?) and most (near-duplicates?) at the last validation, "
                    "by file name, with loss now / base model's loss.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, run: str, **kwargs) -> str:
        # New metrics or checkpoints redraw the curve; an unchanged run reuses ComfyUI's cached picture.
        folder = resolve_run(run)
        return folder_fingerprint(folder, folder / "checkpoints")

    @classmethod
    def execute(cls, run: str, width: int, height: int, smoothing: float) -> io.NodeOutput:
        folder = RunFolder.open(resolve_run(run))
        image = run_loss_curve(folder, width, height, smoothing)
        text = "\n".join(learning_lines(latest_learning(folder.read_per_image())))
        return io.NodeOutput(image, text, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": [text]})


NODES = [KleinLabLossCurve]
