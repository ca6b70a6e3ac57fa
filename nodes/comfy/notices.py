"""Status lines on the Train node: the memory plan, its corrections, and "compiling (one-off)" with the elapsed
time while the first step compiles the blocks (the progress bar shows nothing then)."""

from __future__ import annotations

import logging
import threading
import time

from .feedback import prompt_server

LOG = logging.getLogger("klein_lora_lab")
TICK_SECONDS = 1.0


def show_on_node(node_id: str | None, text: str) -> None:
    """The node's text line (ignored when no server runs); PromptServer.send_progress_text is thread-safe."""
    server = prompt_server()
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id, server.client_id)


class NodeNotices:
    """Notices of one run: shown on the node, logged, kept for the final message."""

    def __init__(self, node_id: str | None) -> None:
        self.node_id = node_id
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._clock: threading.Thread | None = None
        self.compile_seconds: float | None = None

    def show(self, text: str) -> None:
        self.lines.append(text)
        LOG.info("Klein LoRA Lab: %s", text)
        show_on_node(self.node_id, text)

    def start_compile_clock(self) -> None:
        """Tick "compiling (one-off) N s" on the node until `first_step_done` (a daemon thread)."""
        started = time.perf_counter()

        def tick() -> None:
            while not self._stop.wait(TICK_SECONDS):
                plan = "".join(f" · {line}" for line in self._latest())
                show_on_node(self.node_id, f"compiling (one-off) {time.perf_counter() - started:.0f} s{plan}")

        self._started = started
        self._clock = threading.Thread(target=tick, name="klein-lab-compile-clock", daemon=True)
        self._clock.start()

    def first_step_done(self) -> None:
        """Stop the clock (once) and remember how long the first step took."""
        if self._clock is None or self._stop.is_set():
            return
        self._stop.set()
        self._clock.join()
        self.compile_seconds = time.perf_counter() - self._started
        LOG.info("Klein LoRA Lab: first step (compile) took %.1f s", self.compile_seconds)

    def compile_skipped(self) -> None:
        """The run does not compile after all (its base weights stream): stop the clock, no compile time kept."""
        if self._clock is None or self._stop.is_set():
            return
        self._stop.set()
        self._clock.join()

    def _latest(self) -> list[str]:
        """The latest memory line (a plan replaces the one before) and every other notice (fp8 fallback)."""
        memory = [line for line in self.lines if line.startswith("memory")]
        return memory[-1:] + [line for line in self.lines if not line.startswith("memory")]

    def summary(self) -> str:
        """The latest memory line, other notices and the first step's time, for the final message."""
        parts = self._latest()
        if self.compile_seconds is not None:
            parts.append(f"first step (compile) {self.compile_seconds:.1f} s")
        return " ".join(parts)
