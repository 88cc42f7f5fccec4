"""Deterministic faults for the tests of a kill, a Ctrl-C and the resume that follows: the one
place where a test reaches into a run. Inert unless the environment variable is set.

`ADDINOV3_TEST_SIGNAL_AFTER_STEP="K:SIGNAL"` (e.g. "5:SIGKILL", "3:SIGINT"): the training process
sends itself SIGNAL right after step K, once the checkpoints started so far are complete.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

SIGNAL_AFTER_STEP_ENV = "ADDINOV3_TEST_SIGNAL_AFTER_STEP"


def after_step() -> Callable[[int, object], None]:
    """The hook the trainer calls after every step with (step, checkpoint manager)."""
    spec = os.environ.get(SIGNAL_AFTER_STEP_ENV, "")
    if not spec:
        return lambda step, mngr: None
    at, _, name = spec.partition(":")

    def hook(step: int, mngr) -> None:
        if step == int(at):
            mngr.wait_until_finished()
            os.kill(os.getpid(), getattr(signal, name))

    return hook
