"""Klein A/B Compare: two frames of a scrub or mixer grid side by side, their absolute difference and its mean.

Frames are picked by index in the batch or by label text (e.g. "step 1000 · scale 1" vs "step 2500 · scale 1",
or "scale 1" vs "scale 2.5"): the labels input is the JSON the grid nodes output.
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ...trainer_core.analysis.charts import to_image_tensor
from ...trainer_core.analysis.scrub import ScrubError, abs_difference, compose_side_by_side, find_frame
from ..comfy.images import tensor_to_pil

MAX_INDEX = 4095


def parse_labels(text: str, frames: int) -> list[dict]:
    """The grid node's labels JSON, checked against the batch size."""
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScrubError(f"labels is not JSON ({err}): connect the labels output of a scrub or mixer grid.") from None
    if not isinstance(labels, list) or not all(isinstance(r, dict) for r in labels):
        raise ScrubError("labels must be a JSON list of frame records: connect a scrub or mixer grid's labels output.")
    if len(labels) != frames:
        raise ScrubError(
            f"labels list {len(labels)} frames but the image batch has {frames}: connect the frames and labels "
            "outputs of the same node."
        )
    return labels


class KleinLabCompareFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLabCompareFrames",
            display_name="Klein A/B Compare",
            category="Klein LoRA Lab/scrub",
            description="Two frames of a scrub side by side with their labels, the absolute difference, and its mean.",
            inputs=[
                io.Image.Input("frames", tooltip="The frames output of Klein Scrub Checkpoints or the mixer grid."),
                io.String.Input("labels", force_input=True, tooltip="The labels output of the same node."),
                io.Int.Input("index_a", default=0, min=0, max=MAX_INDEX, tooltip="Frame A by index (0 = first)."),
                io.Int.Input("index_b", default=1, min=0, max=MAX_INDEX, tooltip="Frame B by index."),
                io.String.Input(
                    "label_a",
                    default="",
                    tooltip="Frame A by label instead of index, e.g. 'step 1000 · scale 1' (a unique part is enough).",
                ),
                io.String.Input("label_b", default="", tooltip="Frame B by label instead of index."),
                io.Float.Input(
                    "gain",
                    default=1.0,
                    min=1.0,
                    max=100.0,
                    step=0.5,
                    tooltip="Brightens the difference image (×gain, clipped); the mean is always unscaled.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="side_by_side", tooltip="A | B with their labels."),
                io.Image.Output(display_name="difference", tooltip="|A − B| per pixel (× gain)."),
                io.Float.Output(
                    display_name="mean_abs_diff", tooltip="Mean of |A − B| over pixels and channels (0..1)."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, frames, labels: str, index_a: int, index_b: int, label_a: str, label_b: str, gain: float
    ) -> io.NodeOutput:
        records = parse_labels(labels, frames.shape[0])
        a, b = find_frame(records, index_a, label_a), find_frame(records, index_b, label_b)
        images = tensor_to_pil(frames[[a, b]])
        text_a, text_b = str(records[a].get("label", a)), str(records[b].get("label", b))
        pair = to_image_tensor(compose_side_by_side(images[0], images[1], text_a, text_b))
        # measured on the frames themselves (float), not on their 8-bit form
        diff, mean = abs_difference(frames[a].float().cpu().numpy(), frames[b].float().cpu().numpy())
        difference = torch.from_numpy(diff).mul(gain).clamp(0, 1)[None]  # [1, H, W, 3]
        text = f"A = #{a} {text_a}\nB = #{b} {text_b}\nmean |A − B| = {mean:.6f}"
        return io.NodeOutput(pair, difference, mean, ui={**ui.PreviewImage(pair, cls=cls).as_dict(), "text": [text]})


NODES = [KleinLabCompareFrames]
