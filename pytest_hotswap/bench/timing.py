"""Wall-clock timing with medians, synchronising the device so GPU work is inside the interval."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_ms(fn, device) for _ in range(repeats))
