"""The Klein LoRA Mixer's added rows ('+ Add LoRA' in the page): the JSON text its `more_loras` widget carries.

The page's row editor (js/mixer_rows.js) writes `[{"on": true, "lora": "a.safetensors", "scale": 1.0,
"preset": "all"}, ...]`; a blank text means no row. A row may carry its own per-block vector, `"blocks": "1, 0.5, …"`
(the block editor of the row writes it), used when its preset is 'custom' and kept otherwise, so switching the
preset back and forth loses nothing. The text is checked here because the /prompt route (an API
prompt, a hand-edited workflow) can carry anything: every error names the row, the bad value and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import check_number, shown
from ..model.block_weights import PRESETS, parse_block_vector

SCALE_LIMIT = 4.0  # the mixer's scale widgets' range
MAX_ROWS = 64  # far more than a mix needs; a pasted huge list is refused instead of loading hundreds of files
ROW_KEYS = {"on", "lora", "scale", "preset", "blocks"}


@dataclass(frozen=True)
class MixRow:
    on: bool
    lora: str
    scale: float
    preset: str
    blocks: str = ""  # per-block vector text (preset 'custom')

    @property
    def block_vector(self) -> str:
        """The vector the row applies: its blocks with preset 'custom', none with another preset."""
        return self.blocks if self.preset == "custom" else ""


def parse_mix_rows(text: str) -> list[MixRow]:
    """The rows of a `more_loras` text, in order (off rows included)."""
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"more_loras is not valid JSON ({err.msg} at character {err.pos}): use the '+ Add LoRA' rows, or "
            'write a list like [{"on": true, "lora": "a.safetensors", "scale": 1, "preset": "all"}].'
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"more_loras must be a list of rows, got {type(data).__name__}: {shown(data)}.")
    if len(data) > MAX_ROWS:
        raise ValueError(f"more_loras has {len(data)} rows; at most {MAX_ROWS}: chain Klein LoRA Stack nodes for more.")
    return [_row(i + 1, item) for i, item in enumerate(data)]


def _row(n: int, item: object) -> MixRow:
    if not isinstance(item, dict):
        raise ValueError(f"more_loras row {n} must be an object with on, lora, scale, preset; got {shown(item)}.")
    unknown = sorted(set(item) - ROW_KEYS)
    if unknown:
        raise ValueError(
            f"more_loras row {n} has unknown keys {unknown}: the keys are on, lora, scale, preset, blocks."
        )
    on, lora, preset = item.get("on", True), item.get("lora"), item.get("preset", "all")
    if not isinstance(on, bool):
        raise ValueError(f"more_loras row {n}: on={shown(on)} must be true or false.")
    if not isinstance(lora, str) or not lora.strip():
        raise ValueError(f"more_loras row {n}: lora={shown(lora)} must name a file of the loras list.")
    if preset not in PRESETS:
        raise ValueError(f"more_loras row {n}: preset={shown(preset)} is not one of {', '.join(PRESETS)}.")
    blocks = item.get("blocks", "")
    if not isinstance(blocks, str):
        raise ValueError(f"more_loras row {n}: blocks={shown(blocks)} must be a text like '1, 0.5, 0'.")
    try:
        vector = parse_block_vector(blocks)
    except ValueError as err:
        raise ValueError(f"more_loras row {n}: {err}") from None
    if preset == "custom" and vector is None:
        raise ValueError(f"more_loras row {n}: preset 'custom' needs its blocks: move a slider of the row's blocks.")
    scale = check_number(item.get("scale", 1.0), f"more_loras row {n} scale", -SCALE_LIMIT, SCALE_LIMIT)
    return MixRow(on, lora, scale, preset, blocks)
