"""The benchmark's settings: one frozen dataclass shared by every measurement."""

from __future__ import annotations

import dataclasses
from typing import Any

from pytest_hotswap.options import MAX_RANK

#: Timed calls per candidate (swaps, forwards, copies) for one median, full run and smoke run.
REPEATS, SMOKE_REPEATS = 30, 5
#: Samples of what is costly to repeat (reloads, stalls, end-to-end sequences, processes).
SAMPLES, SMOKE_SAMPLES = 7, 1


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes and compile settings. ``smoke`` shrinks every size so the whole run takes seconds.

    ``repeats`` is the number of timed calls behind each median of a cheap thing (a swap, a
    forward); ``samples`` the number of samples of a costly one (an unload + reload, the first
    call after a swap, an end-to-end sequence, a pytest process). The GPU mode
    (``device="cuda"``) defaults to bf16, inductor ``max-autotune-no-cudagraphs`` and, on compute
    capability >= 8.9, torchao float8-dynamic.
    """

    smoke: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    backends: tuple[str, ...] = ("eager", "aot_eager", "inductor")
    mode: str = "default"
    quantize: str = "none"
    max_rank: int = MAX_RANK.default
    swap_rank: int = 32
    repeats: int = REPEATS
    samples: int = SAMPLES
    seed: int = 0

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
