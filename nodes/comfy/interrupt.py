"""Cancel: ComfyUI's interrupt flag, polled between steps, and the exception that ends the prompt."""

from __future__ import annotations

import logging
from typing import NoReturn

import comfy.model_management as mm

LOG = logging.getLogger("klein_lora_lab")


def interrupt_requested() -> bool:
    """True once the user pressed Cancel (or /interrupt was posted) during this prompt."""
    return mm.processing_interrupted()


def raise_interrupt() -> NoReturn:
    """Clear the flag and raise ComfyUI's interruption, so the prompt ends as 'interrupted' as usual."""
    mm.interrupt_current_processing(False)
    raise mm.InterruptProcessingException()
