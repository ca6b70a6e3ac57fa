"""The parent's loop over spawned processes (`follow_processes`), on fake processes and queues: events relayed,
Cancel passed on, and what a dead process means under each death policy (data-parallel ranks, sweep workers)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import pytest
from klein_lora_lab.trainer_core.training.distributed import RANK_DEATH
from klein_lora_lab.trainer_core.training.spawn import GRACE_POLLS, RunDone, follow_processes
from klein_lora_lab.trainer_core.training.workers import WORKER_DEATH

MAX_POLLS = 500  # a loop that never returns fails the test instead of hanging it


class FakeProcess:
    """A process whose life the script decides: alive until `end(code)`; `terminate()` ends it with -15."""

    def __init__(self) -> None:
        self.exitcode: int | None = None
        self.terminated = False

    def is_alive(self) -> bool:
        return self.exitcode is None

    def end(self, code: int = 0) -> None:
        self.exitcode = code

    def terminate(self) -> None:
        self.terminated = True
        if self.exitcode is None:
            self.exitcode = -15


class ScriptedQueue:
    """Each get() plays the next step: an event tuple is returned; None is an empty poll; a callable (a change in
    the processes) runs, then the poll is empty. After the script every poll is empty."""

    def __init__(self, *script: tuple | Callable[[], None] | None) -> None:
        self.script = list(script)
        self.polls = 0

    def get(self, timeout: float) -> tuple:
        self.polls += 1
        assert self.polls < MAX_POLLS, "follow_processes did not return"
        step = self.script.pop(0) if self.script else None
        if isinstance(step, tuple):
            return step
        if step is not None:
            step()
        raise queue.Empty


def _done(key: int, steps: int = 4) -> tuple:
    return ("done", key, "cpu", steps, False, f"/runs/r{key}/step_{steps}.safetensors", 0.5, ["a note"])


def test_reports_are_relayed_and_collected_by_key() -> None:
    """Every event reaches on_event in order; 'done' events come back as RunDone by key; no failure."""
    a, b = FakeProcess(), FakeProcess()
    events = ScriptedQueue(("started", 0, "cpu"), ("step", 0, 1, 4, 0.9, 1e-3, 0.1), _done(0), _done(1), a.end, b.end)
    seen: list[tuple] = []
    done, failure = follow_processes([a, b], events, threading.Event(), WORKER_DEATH, seen.append)
    assert failure == ""
    assert [e[0] for e in seen] == ["started", "step", "done", "done"]
    assert set(done) == {0, 1} and isinstance(done[1], RunDone)
    assert done[0].steps_done == 4 and done[0].last_checkpoint.name == "step_4.safetensors"
    assert done[0].notes == ("a note",)


def test_cancel_sets_stop() -> None:
    """should_stop (Cancel in the parent) sets the shared stop event the processes read."""
    a, stop = FakeProcess(), threading.Event()
    follow_processes([a], ScriptedQueue(None, a.end), stop, WORKER_DEATH, should_stop=lambda: True)
    assert stop.is_set()


def test_a_failing_rank_terminates_every_rank() -> None:
    """Data parallel: a rank's error ends the run with that rank's message, and every rank still alive (waiting in
    a collective) is terminated rather than left to finish."""
    r0, r1, stop = FakeProcess(), FakeProcess(), threading.Event()
    events = ScriptedQueue(("error", 1, "cpu", "MemoryError: no room"), lambda: r1.end(1))
    done, failure = follow_processes([r0, r1], events, stop, RANK_DEATH)
    assert failure == "rank 1 on cpu failed: MemoryError: no room"
    assert stop.is_set() and r0.terminated and done == {}


def test_a_failing_worker_stops_the_others_without_terminating_them() -> None:
    """Sweep workers: a worker's error sets stop; the other worker is not terminated, finishes its run and its
    report is kept, and the failure names the worker's run."""
    w0, w1, stop = FakeProcess(), FakeProcess(), threading.Event()
    events = ScriptedQueue(("error", 2, "cuda:1", "ValueError: bad"), lambda: w1.end(1), None, _done(0), w0.end)
    done, failure = follow_processes([w0, w1], events, stop, WORKER_DEATH)
    assert failure == "the worker on cuda:1 failed (run 2): ValueError: bad"
    assert stop.is_set() and not w0.terminated and w0.exitcode == 0
    assert set(done) == {0}


@pytest.mark.parametrize("policy", [RANK_DEATH, WORKER_DEATH], ids=["ranks", "workers"])
def test_a_silent_death_fails_after_the_grace_polls(policy) -> None:
    """A process that ends with an error code and no report fails the job with its exit code, but only after
    GRACE_POLLS empty polls (its own report may still be in the pipe); a report arriving within them wins."""
    a, b = FakeProcess(), FakeProcess()
    events = ScriptedQueue(lambda: a.end(-9), *[None] * (GRACE_POLLS + 5), b.end)
    _, failure = follow_processes([a, b], events, threading.Event(), policy)
    assert failure.startswith("a ") and "exit code -9" in failure
    assert b.terminated == policy.terminate  # ranks: ended at once; workers: b ends on its own
    assert events.polls == (GRACE_POLLS + 1 if policy.terminate else GRACE_POLLS + 7)

    a, b = FakeProcess(), FakeProcess()
    late = [None] * (GRACE_POLLS - 1)
    events = ScriptedQueue(lambda: a.end(1), *late, ("error", 0, "cpu", "OSError: disk"), b.end)
    _, failure = follow_processes([a, b], events, threading.Event(), policy)
    assert "OSError: disk" in failure and "exit code" not in failure


def test_a_rank_dying_after_the_final_report_does_not_fail_the_run() -> None:
    """Data parallel: rank 0 reports the whole run after the group is torn down, so a rank that dies after that
    report died in teardown: the run is complete, no failure. A sweep worker dying after one run's report still
    fails (its other runs are unfinished)."""
    r0, r1 = FakeProcess(), FakeProcess()
    events = ScriptedQueue(_done(0), r0.end, lambda: r1.end(-6))
    done, failure = follow_processes([r0, r1], events, threading.Event(), RANK_DEATH)
    assert failure == "" and set(done) == {0}

    w0, w1 = FakeProcess(), FakeProcess()
    events = ScriptedQueue(_done(0), w0.end, lambda: w1.end(-6))
    _, failure = follow_processes([w0, w1], events, threading.Event(), WORKER_DEATH)
    assert failure == "a worker process ended with exit code -6 before finishing its runs."
