"""The Klein LoRA Mixer's added rows: the `more_loras` JSON text parsed into rows, refused with the row and fix."""

from __future__ import annotations

import json

import pytest
from klein_lora_lab.trainer_core.lora.mix_rows import MAX_ROWS, MixRow, parse_mix_rows


def test_rows_parse_in_order_with_defaults() -> None:
    """Rows keep their order and their off switches; a missing on/scale/preset means on, 1 and 'all'; blank = none."""
    text = json.dumps([{"on": False, "lora": "a.safetensors", "scale": -0.5, "preset": "identity"}, {"lora": "b"}])
    assert parse_mix_rows(text) == [MixRow(False, "a.safetensors", -0.5, "identity"), MixRow(True, "b", 1.0, "all")]
    assert parse_mix_rows("") == [] and parse_mix_rows("  \n") == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[{", "not valid JSON"),
        ('{"lora": "a"}', "must be a list"),
        ("[1]", "row 1 must be an object"),
        ('[{"lora": "a"}, {"lora": ""}]', "row 2: lora=''"),
        ('[{"lora": "a", "strength": 1}]', "unknown keys ['strength']"),
        ('[{"lora": "a", "on": "yes"}]', "on='yes' must be true or false"),
        ('[{"lora": "a", "preset": "nope"}]', "preset='nope' is not one of all, binding"),
        ('[{"lora": "a", "preset": "custom"}]', "row 1: preset 'custom' needs its blocks"),
        ('[{"lora": "a", "blocks": 3}]', "row 1: blocks=3 must be a text"),
        ('[{"lora": "a", "preset": "custom", "blocks": "1, x"}]', "row 1: block vector item 2 is 'x'"),
        ('[{"lora": "a", "scale": 9}]', "row 1 scale=9 is out of range"),
        ('[{"lora": "a", "scale": "1"}]', "is not a number"),
        ('[{"lora": "a", "scale": NaN}]', "not a finite number"),
    ],
)
def test_bad_rows_are_refused_with_the_row_and_the_fix(text: str, words: str) -> None:
    """Whatever the /prompt route carries, a bad text is refused with a message naming the row and the value."""
    with pytest.raises(ValueError, match=None) as err:
        parse_mix_rows(text)
    assert words in str(err.value)


def test_too_many_rows_are_refused() -> None:
    """A pasted list longer than MAX_ROWS is refused (it would load that many files) and points to LoRA Stack."""
    with pytest.raises(ValueError, match="Klein LoRA Stack"):
        parse_mix_rows(json.dumps([{"lora": "a"}] * (MAX_ROWS + 1)))


def test_row_blocks_apply_only_with_preset_custom() -> None:
    """A row's per-block vector is what it applies with preset 'custom'; with another preset it is kept in the row
    (switching back loses nothing) but not applied."""
    custom, kept = parse_mix_rows(
        json.dumps(
            [
                {"lora": "a", "preset": "custom", "blocks": "1, 0.5 0"},
                {"lora": "b", "preset": "texture", "blocks": "1, 0.5 0"},
            ]
        )
    )
    assert custom.block_vector == "1, 0.5 0"
    assert kept.blocks == "1, 0.5 0" and kept.block_vector == ""
