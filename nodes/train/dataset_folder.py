"""Dataset from a folder: images with same-name .txt captions, trigger word, aspect buckets, a summary."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.dataset import scan_folder
from ..comfy.paths import allowed_roots, folder_fingerprint, resolve_album_folder
from ..comfy.sockets import DATASET
from ..comfy.widgets import FOLDER_TIP, trigger_inputs


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
