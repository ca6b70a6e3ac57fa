"""Which album items the LoRA learns least and most, read from a run's per_image.jsonl.

At every validation the trainer measures each album item's velocity loss at the validation σ, at one fixed
noise, with the LoRA and (once) with the base model (training/trainer.py, `per_image_record`). The ratio

    left = loss now / base model's loss      (1 = not learned at all; lower = learned more)

puts every item on the same scale whatever its content (a busy image has a higher loss than a plain one for the
base model too). Read against the album's median:

  least learned  the ratio stays near 1 while the album's falls: the item does not fit the concept the rest of
                 the album teaches (another subject, an odd crop, a watermark, a caption that says otherwise);
  most learned   the ratio falls far below the album's: the LoRA learns the item by heart, most often because
                 it is a near-duplicate of another or shares its backdrop, the course's "learns the dataset
                 instead of the concept".

Nothing here imports ComfyUI.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..album.dataset import list_images, load_image
from ..album.dataset_lint import LintFinding, LintReport
from .charts import chart_font
from .scrub import compose_grid, thumbnail

THUMB_PX = 160  # longest side of a thumbnail in the learned-items sheet


@dataclass(frozen=True)
class ItemLearning:
    """One album item at one validation: its loss now, the base model's, and whether it was held out."""

    name: str
    loss: float
    base_loss: float
    held_out: bool = False

    @property
    def left(self) -> float:
        """loss / base loss: the share of the base model's loss still left (lower = learned more)."""
        return self.loss / self.base_loss if self.base_loss > 0 else 1.0


@dataclass(frozen=True)
class Learning:
    """The latest per-image record of a run, items sorted from least to most learned."""

    step: int
    items: tuple[ItemLearning, ...]

    @property
    def median(self) -> float:
        return statistics.median(item.left for item in self.items)

    def least(self, count: int) -> list[ItemLearning]:
        return list(self.items[:count])

    def most(self, count: int) -> list[ItemLearning]:
        """The `count` most learned, most learned first (never one also listed among the least learned)."""
        rest = self.items[min(count, len(self.items) // 2) :]
        return list(reversed(rest))[:count]


def latest_learning(records: Sequence[Mapping[str, Any]]) -> Learning | None:
    """The last record of per_image.jsonl as a Learning (None when the run measured none yet)."""
    if not records:
        return None
    last = records[-1]
    items = [
        ItemLearning(str(i["name"]), float(i["loss"]), float(i["base_loss"]), bool(i.get("held_out", False)))
        for i in last.get("items", [])
    ]
    if not items:
        return None
    return Learning(int(last["step"]), tuple(sorted(items, key=lambda item: item.left, reverse=True)))


def learning_summary(learning: Learning | None, count: int = 3) -> dict[str, Any] | None:
    """The least and most learned items as plain data (the panel's history route)."""
    if learning is None:
        return None

    def rows(items: Sequence[ItemLearning]) -> list[dict[str, Any]]:
        return [{"name": i.name, "left": i.left, "held_out": i.held_out} for i in items]

    return {
        "step": learning.step,
        "median": learning.median,
        "least": rows(learning.least(count)),
        "most": rows(learning.most(count)),
    }


def _listed(items: Sequence[ItemLearning]) -> str:
    return ", ".join(f"{item.name} {item.left:.2f}" + (" (held out)" if item.held_out else "") for item in items)


def learning_lines(learning: Learning | None, count: int = 3) -> list[str]:
    """The per-image list in words: the least and most learned items with their ratios and what to check."""
    if learning is None:
        return ["per-image loss: none measured yet (it is measured at each validation: set validation_every)."]
    return [
        f"per-image loss at step {learning.step} (loss now / base model's; lower = learned more; album median "
        f"{learning.median:.2f}):",
        f"least learned: {_listed(learning.least(count))}. Items near 1 do not fit what the rest of the album "
        "teaches: check for another subject, an odd crop, a watermark or a caption that says otherwise.",
        f"most learned: {_listed(learning.most(count))}. Items far below the median are learned by heart: check "
        "for near-duplicates and a shared backdrop.",
    ]


def learning_findings(learning: Learning | None, count: int = 3) -> list[LintFinding]:
    """The least and most learned items as Dataset Lint notes (their files named)."""
    if learning is None:
        return []
    median = learning.median
    return [
        LintFinding(
            "least_learned",
            "note",
            f"the run learned these least by step {learning.step} (loss left vs the base model, album median "
            f"{median:.2f}): {_listed(learning.least(count))}; do they show the concept?",
            tuple(item.name for item in learning.least(count)),
        ),
        LintFinding(
            "most_learned",
            "note",
            f"the run learned these most by step {learning.step}: {_listed(learning.most(count))}; near-duplicates "
            "or a shared backdrop are learned by heart",
            tuple(item.name for item in learning.most(count)),
        ),
    ]


def with_learning(report: LintReport, learning: Learning | None, count: int = 3) -> LintReport:
    """A Dataset Lint report with the run's least and most learned items added as notes."""
    return replace(report, findings=report.findings + tuple(learning_findings(learning, count)))


def note_image(text: str, width: int = 640) -> Image.Image:
    """A one-line picture saying why there are no thumbnails (an IMAGE output always carries a picture)."""
    font = chart_font(16)
    img = Image.new("RGB", (width, 40), "white")
    ImageDraw.Draw(img).text((10, 10), text, fill="black", font=font)
    return img


def learning_sheet(
    learning: Learning | None, folder: Path, count: int = 4, roots: Sequence[Path | str] | None = None
) -> Image.Image:
    """Thumbnails of the least (top row) and most (bottom row) learned items found in `folder`, each labelled
    with its name and ratio; a note picture when there is no record or none of the items is in the folder."""
    if learning is None:
        return note_image("no per-image loss: give a run that measured validations (validation_every).")
    files = {path.name: path for path in list_images(folder, roots)}  # refuses files linked from outside roots
    rows = [learning.least(count), learning.most(count)]
    if not any(item.name in files for row in rows for item in row):
        return note_image(f"none of the run's items is in {folder.name}: lint the album the run trained on.")
    cols = max(len(row) for row in rows)
    blank = Image.new("RGB", (THUMB_PX, THUMB_PX), "white")
    cells, labels = [], []
    for row in rows:
        for k in range(cols):
            item = row[k] if k < len(row) else None
            path = files.get(item.name) if item is not None else None
            picture = thumbnail(load_image(path), THUMB_PX) if path is not None else blank
            cell = blank.copy()
            cell.paste(picture, ((THUMB_PX - picture.width) // 2, (THUMB_PX - picture.height) // 2))
            cells.append(cell)
            labels.append("" if item is None else f"{item.name} {item.left:.2f}")
    return compose_grid(
        cells,
        cols,
        labels,
        ["least learned", "most learned"],
        [f"#{k + 1}" for k in range(cols)],
        title=f"per-image loss at step {learning.step} (loss left vs base; album median {learning.median:.2f})",
    )
