"""Image-to-image dataset: one or more reference folders and a target folder matched by file name."""

from __future__ import annotations

from comfy_api.latest import io

from ...trainer_core.album.dataset import reference_folder_lines, scan_pairs
from ..comfy.paths import allowed_roots, folder_fingerprint, resolve_album_folder
from ..comfy.sockets import DATASET
from ..comfy.widgets import trigger_inputs


class KleinLabDatasetPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabDatasetPairs",
            display_name="Klein Dataset (Image Pairs)",
            category="Klein LoRA Lab/train",
            description=(
                "Reference → target pairs for an edit LoRA, matched by file name (e.g. pimpmyride_control/001.png → "
                "pimpmyride/001.png). Several references per target: one reference folder per line, or files named "
                "001_ref1.png, 001_ref2.png… Captions come from the target folder. Unmatched files are listed in "
                "one error."
            ),
            inputs=[
                io.String.Input(
                    "reference_folder",
                    default="",
                    multiline=True,
                    tooltip=(
                        "Folder of the input images (what the LoRA gets): absolute, or inside ComfyUI's input. "
                        "Several references per target: one folder per line (reference 1, 2, … in line order), or "
                        "files named 001_ref1.png, 001_ref2.png… in one folder. Apply the LoRA with one "
                        "ReferenceLatent per reference, chained in the same order."
                    ),
                ),
                io.String.Input(
                    "target_folder",
                    default="",
                    tooltip="Folder of the wanted results, same file names as the references, with .txt captions.",
                ),
                *trigger_inputs(),
            ],
            outputs=[DATASET.Output(display_name="dataset"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, reference_folder: str, target_folder: str, **kwargs) -> str:
        folders = [resolve_album_folder(f) for f in (*reference_folder_lines(reference_folder), target_folder)]
        return folder_fingerprint(*folders)

    @classmethod
    def execute(
        cls,
        reference_folder: str,
        target_folder: str,
        trigger: str,
        trigger_mode: str,
        resolution: int,
        default_caption: str,
    ) -> io.NodeOutput:
        dataset = scan_pairs(
            [resolve_album_folder(folder) for folder in reference_folder_lines(reference_folder)],
            resolve_album_folder(target_folder),
            resolution,
            trigger,
            trigger_mode,
            default_caption,
            roots=allowed_roots(),  # files linked from outside the allowed folders are refused
        )
        summary = dataset.summary()
        return io.NodeOutput(dataset, summary, ui={"text": [summary]})


NODES = [KleinLabDatasetPairs]
