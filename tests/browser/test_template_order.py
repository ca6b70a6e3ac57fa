"""The pack's templates appear in the course's order (Klein 01 first) in ComfyUI's templates dialog.

ComfyUI's server lists a pack's workflows in directory order (app/custom_node_manager.py: glob, unsorted) and the
frontend keeps that order; js/klein_lora_lab.js sorts this pack's list. tests/browser/template_order.mjs opens the
dialog, picks the pack under Extensions and reads the cards in page order, then searches "Klein".
"""

from __future__ import annotations

from typing import Any

import pytest
from harness.browser import run_driver
from harness.comfy_env import PACK_ROOT
from harness.server import PACK_DIR_NAME

COURSE = sorted(p.stem for p in (PACK_ROOT / "workflows").glob("*.json"))  # two-digit numbers: name order


@pytest.fixture(scope="module")
def dialog(comfy_server) -> dict[str, Any]:
    return run_driver("template_order.mjs", comfy_server.url)


def test_course_order_is_by_number() -> None:
    """Every workflow is numbered 'Klein NN - …', so the name order is the course's order, Klein 01 first."""
    assert COURSE[0].startswith("Klein 01 - ")
    assert [int(name.split()[1]) for name in COURSE] == list(range(1, len(COURSE) + 1))


def test_page_api_gives_the_pack_in_course_order(dialog) -> None:
    """The page's getWorkflowTemplates (what the dialog reads) lists the pack's workflows in the course's order,
    the same set the server lists; other packs' lists are left as the server gave them."""
    assert sorted(dialog["server"][PACK_DIR_NAME]) == COURSE
    assert dialog["api"][PACK_DIR_NAME] == COURSE
    others = {k: v for k, v in dialog["server"].items() if k != PACK_DIR_NAME}
    assert {k: v for k, v in dialog["api"].items() if k != PACK_DIR_NAME} == others


def test_dialog_shows_the_pack_in_course_order(dialog) -> None:
    """In the dialog, the pack's entry under Extensions shows Klein 01 first and every card in the course's order.
    A 'Klein' search shows them all, ranked by the frontend's search score (shorter names score higher; the
    search's order is the frontend's, not the list's)."""
    assert dialog["category"] == COURSE
    assert sorted(name for name in dialog["search"] if name in COURSE) == COURSE


def test_no_page_errors_from_the_pack(dialog) -> None:
    """The page logs no error that mentions the pack while the dialog is used."""
    errors = [e for e in dialog["pageErrors"] if "Content Security Policy" not in e]
    assert [e for e in errors if "klein" in e.lower()] == []
