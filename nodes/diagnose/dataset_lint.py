"""Klein Dataset Lint: what to fix in an album before training (duplicates, sizes, captions, trigger,
backdrops, album size for the preset), each finding with its files. Needs no model: run it before encoding."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.dataset import reference_folder_lines
from ...trainer_core.album.dataset_lint import PRESET_ALBUM_SIZES, lint_album
from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.per_image import latest_learning, learning_sheet, with_learning
from ..comfy.paths import allowed_roots, folder_fingerprint, resolve_album_folder
from ..comfy.runs import open_existing_run, run_folder
from ..comfy.widgets import FOLDER_TIP, TRIGGER_TIP


class KleinLabDatasetLint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabDatasetLint",
            display_name="Klein Dataset Lint",
            category="Klein LoRA Lab/diagnostics",
            description=(
                "Checks an album before training: near-duplicates, small or oddly shaped images, missing or empty "
                "captions, captions without the trigger, flat backdrops, unpaired files and too few images for "
                "the preset. Each warning names the files."
            ),
            inputs=[
                io.String.Input("folder", default="", tooltip=FOLDER_TIP + " For pairs: the target folder."),
                io.String.Input(
                    "pairs_folder",
                    default="",
                    multiline=True,
                    tooltip="Image-to-image only: the reference (control) folder, matched by file name; several "
                    "references per target: one folder per line, or files named 001_ref1.png, 001_ref2.png… "
                    "Empty for a plain album.",
                ),
                io.String.Input("trigger", default="TOK", tooltip=TRIGGER_TIP),
                io.Combo.Input(
                    "preset",
                    options=list(PRESET_ALBUM_SIZES),
                    default="style",
                    tooltip="The preset you will train with: sets the album size the course recommends (style "
                    "50-200, character 20-60, object 30-100, image_to_image 30-100 pairs).",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=16,
                    max=4096,
                    step=16,
                    tooltip="The base resolution you will bucket at (for the crop notes).",
                ),
                io.String.Input(
                    "run",
                    default="",
                    optional=True,
                    tooltip="After training: a run name trained on this album. Its per-image loss (measured at each "
                    "validation) adds the items the LoRA learned least (outliers?) and most (near-duplicates?), "
                    "with thumbnails. Empty: the album checks only.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The findings, one line each, with file names."),
                io.String.Output(display_name="warnings_json", tooltip="The findings as JSON (code, severity, files)."),
                io.Image.Output(
                    display_name="learned_items",
                    tooltip="With a run: thumbnails of the items learned least (top row) and most (bottom row), "
                    "each with its loss now / base model's loss.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, pairs_folder: str, run: str = "", **kwargs) -> str:
        folders = [resolve_album_folder(f) for f in (folder, *reference_folder_lines(pairs_folder)) if f.strip()]
        folders += [run_folder(run)] if run.strip() else []  # a new validation's records re-runs the lint
        return folder_fingerprint(*folders) + "|" + "|".join(f"{k}={v}" for k, v in sorted(kwargs.items()))

    @classmethod
    def execute(
        cls, folder: str, pairs_folder: str, trigger: str, preset: str, resolution: int, run: str = ""
    ) -> io.NodeOutput:
        pairs = [resolve_album_folder(f) for f in reference_folder_lines(pairs_folder)] or None
        album = resolve_album_folder(folder)
        report = lint_album(album, trigger, preset, pairs, resolution, roots=allowed_roots())
        learning = latest_learning(open_existing_run(run).read_per_image()) if run.strip() else None
        report = with_learning(report, learning)
        sheet = to_image_tensor(learning_sheet(learning, album, roots=allowed_roots()))
        text = report.to_text()
        return io.NodeOutput(text, report.to_json(), sheet, ui={"text": [text]})


NODES = [KleinLabDatasetLint]
