"""Wall-clock timing, synchronising the device so GPU work is inside the interval.

Things compared with each other are timed *interleaved*: :func:`interleaved` runs a few calls of
each candidate per round, rotating which goes first, so drift in the machine's load (other
processes, thermal state) hits every candidate alike. A ratio is then taken per round (medians of
the same round) and its spread reported over rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping

from pytest_hotswap.bench.results import Stat

#: Per candidate: the rounds, each a list of ms timings.
Rounds = dict[str, list[list[float]]]


def synchronize(device: str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Milliseconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def samples_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """``repeats`` timings of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [time_ms(fn, device) for _ in range(repeats)]


def stat_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> Stat:
    return Stat.of(samples_ms(fn, device, repeats, warmup))


def split(repeats: int, max_rounds: int = 10) -> tuple[int, int]:
    """``(rounds, calls per round)`` giving at least ``repeats`` timed calls per candidate."""
    rounds = max(1, min(repeats, max_rounds))
    return rounds, math.ceil(repeats / rounds)


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    device: str,
    repeats: int,
    *,
    warmup: int = 1,
    max_rounds: int = 10,
) -> Rounds:
    """Time every candidate ``repeats`` times (at least), in rounds that rotate the order."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    rounds, per_round = split(repeats, max_rounds)
    names = list(candidates)
    timings: Rounds = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = candidates[name]
            timings[name].append([time_ms(fn, device) for _ in range(per_round)])
    return timings


def pooled(rounds: list[list[float]]) -> Stat:
    """Every timing of every round."""
    return Stat.of(t for one in rounds for t in one)


def ratio(numerator: list[list[float]], denominator: list[list[float]]) -> Stat:
    """Round by round, the median of one over the median of the other."""
    return Stat.of(
        statistics.median(a) / statistics.median(b)
        for a, b in zip(numerator, denominator, strict=True)
    )


def difference(minuend: list[list[float]], subtrahend: list[list[float]]) -> Stat:
    """Round by round, the median of one minus the median of the other."""
    return Stat.of(
        statistics.median(a) - statistics.median(b)
        for a, b in zip(minuend, subtrahend, strict=True)
    )
