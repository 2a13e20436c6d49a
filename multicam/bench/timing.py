"""Timing and memory for the benchmark suite: interleaved best-of-N rounds, peak RSS.

Contenders are timed side by side in one process, one call of each in turn, in a fresh
random order every round, after one warm-up call each (excluded and reported on its own:
tracing, compilation, caches). Nothing here knows a framework; a contender is a
zero-argument callable that returns what it computed, so that nothing is left lazy.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Timing", "peak_memory_mb", "time_interleaved"]


@dataclasses.dataclass
class Timing:
    """One contender on one case (architecture, framework, batch size N, targets T).

    ``kind`` says what the contender is: ``forward`` (a plain inference forward),
    ``floor`` (the framework's fastest hand-written forward + backward to the layer: the
    denominator of every ratio), ``floor-extra`` (other hand-written forms, reported
    beside it: eager floors, ``torch.compile``), ``multicam``, ``multicam-extra``
    (multicam in another mode, e.g. the TensorFlow backend with ``compile=False``) or
    ``peer``.
    """

    arch: str
    framework: str
    batch: int
    targets: int
    contender: str
    kind: str
    times: list[float]
    warmup_s: float
    peak_mb: float | None = None
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no sampling
        return 0


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Largest growth of the resident set during ``fn()``, in MiB (sampled every ~0.2 ms)."""
    base = _rss_bytes()
    if base == 0:
        return None
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak[0] = max(peak[0], _rss_bytes())
        del result
    finally:
        done.set()
        thread.join()
    return (peak[0] - base) / 2**20


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    seed: int = 0,
    failures: dict[str, str] | None = None,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm each contender up once, then time ``repeats`` rounds, shuffled every round.

    A contender that raises during its warm-up is dropped and its error recorded in
    ``failures`` (without ``failures``, the error propagates).

    Returns:
        ``(times, warmup)``: seconds per round per contender, and each warm-up's seconds.
    """
    warmup: dict[str, float] = {}
    for name, fn in list(contenders.items()):
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a contender that fails here: reported, not timed
            if failures is None:
                raise
            failures[name] = f"fails here: {type(exc).__name__}: {exc}"[:400]
            contenders = {k: v for k, v in contenders.items() if k != name}
            continue
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            result = contenders[name]()
            times[name].append(time.perf_counter() - start)
            del result
    return times, warmup
