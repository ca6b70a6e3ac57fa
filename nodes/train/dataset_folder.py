"""Dataset from a folder: images with same-name .txt captions, trigger word, aspect buckets, a summary."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.dataset import TRIGGER_MODES, scan_folder
from ..comfy.paths import allowed_roots, folder_fingerprint, resolve_album_folder

DATASET = io.Custom("KLEIN_DATASET")

FOLDER_TIP = (
    "Album folder: an absolute path, or a path inside ComfyUI's input folder. "
    "Images: png/jpg/jpeg/webp; captions: same-name .txt files."
)
TRIGGER_TIP = "Trigger word the LoRA learns (e.g. TOK, TOKSTYLE). '[trigger]' inside a caption is replaced by it."
MODE_TIP = "Where the trigger goes when a caption lacks it: prepend ('TOK, caption'), append, or none."
RESOLUTION_TIP = (
    "Base resolution: every image goes to an aspect bucket of about this many pixels² (sides are multiples "
    "of 16). 512 trains fast; 1024 is Klein's native size."
)
DEFAULT_CAPTION_TIP = (
    "Caption for images without a .txt file (the trigger is added). "
    "Empty: such images get the trigger alone, with a warning in the summary."
)


def trigger_inputs() -> list[io.Input]:
    """Widgets shared by the folder and pairs nodes."""
    return [
        io.String.Input("trigger", default="TOK", tooltip=TRIGGER_TIP),
        io.Combo.Input("trigger_mode", options=list(TRIGGER_MODES), default="prepend", tooltip=MODE_TIP),
        io.Int.Input("resolution", default=512, min=16, max=4096, step=16, tooltip=RESOLUTION_TIP),
        io.String.Input("default_caption", default="", tooltip=DEFAULT_CAPTION_TIP),
    ]


class KleinLabDatasetFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabDatasetFolder",
            display_name="Klein Dataset (Folder)",
            category="Klein LoRA Lab/train",
            description="Scans an album folder: captions, trigger word, aspect buckets. Read the summary first.",
            inputs=[io.String.Input("folder", default="", tooltip=FOLDER_TIP), *trigger_inputs()],
            outputs=[DATASET.Output(display_name="dataset"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str, **kwargs) -> str:
        return folder_fingerprint(resolve_album_folder(folder))

    @classmethod
    def execute(
        cls, folder: str, trigger: str, trigger_mode: str, resolution: int, default_caption: str
    ) -> io.NodeOutput:
        dataset = scan_folder(
            resolve_album_folder(folder), resolution, trigger, trigger_mode, default_caption, roots=allowed_roots()
        )
        summary = dataset.summary()
        return io.NodeOutput(dataset, summary, ui={"text": [summary]})


NODES = [KleinLabDatasetFolder]
