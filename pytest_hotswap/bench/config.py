"""The benchmark's settings: one frozen dataclass shared by every measurement."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes and compile settings. ``smoke`` shrinks every size so the whole run takes seconds.

    The GPU mode (``device="cuda"``) defaults to bf16, inductor ``max-autotune`` and torchao
    float8-dynamic, the setup of the seed result.
    """

    smoke: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    backends: tuple[str, ...] = ("eager", "aot_eager", "inductor")
    mode: str = "default"
    quantize: str = "none"
    max_rank: int = 128
    swap_rank: int = 32
    repeats: int = 7
    seed: int = 0

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
