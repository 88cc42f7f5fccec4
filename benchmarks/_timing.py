"""Interleaved timing for the benchmarks that compare sides (ours vs a reference): every side is
called once to warm up, then the sides take turns `reps` times, so that a machine that slows
down or speeds up during the run affects every side alike."""

import time
from collections.abc import Callable


def interleaved(sides: dict[str, Callable[[], object]], reps: int):
    """({name: warm-up result}, {name: [seconds per call]}) over `reps` interleaved rounds."""
    warm = {name: fn() for name, fn in sides.items()}
    times = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return warm, times
