"""Measurement 3: what the zeros cost. Eager forward time of a rank-``TRUE_RANK`` adapter loaded
unpadded, against the same adapter padded to each rank in ``PADDED_RANKS``, on the Flux-shaped
models.

Every configuration is its own model on the same base weights (``models.sharing_weights``), so
the forwards are timed interleaved, ``repeats`` each: the unpadded baseline is measured in every
round next to the padded ones, and ``x_unpadded`` is a ratio per round. R = 16 is the same math
as unpadded: it reads 1 up to noise.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from pytest_hotswap import pipelines
from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import interleaved, pooled, ratio

TRUE_RANK = 16
PADDED_RANKS = (16, 64, 128, 256)
UNPADDED = "none"


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result(
        "padding_overhead",
        f"Padding overhead: eager forward, rank-{TRUE_RANK} LoRA unpadded vs padded to R, "
        f"{config.repeats} forwards each, interleaved (ms, median [IQR]; x = ratio per round)",
    )
    for shape in models.flux_shapes(config.smoke)[1:]:
        result.rows += _measure(shape, config, workdir)
        gc.collect()
    return result


def _measure(shape: models.FluxShape, config: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    base = models.build_flux(shape, config)
    call = models.flux_call(shape, config)
    lora = models.make_adapter(base, TRUE_RANK, config.seed, workdir, config)
    configurations = {UNPADDED: base}
    configurations.update({r: models.sharing_weights(base, shape) for r in PADDED_RANKS})
    forwards = {}
    for padded_to, model in configurations.items():
        models.load_adapter(model, lora, None if padded_to == UNPADDED else padded_to)
        pipelines.quantize_denoiser(model, config.quantize)
        forwards[padded_to] = models.forward(model, call)
    timings = interleaved(forwards, config.device, config.repeats)
    return [
        {
            "model": shape.name,
            "shape": shape.label,
            "padded_to": padded_to,
            "forward_ms": pooled(timings[padded_to]),
            "x_unpadded": ratio(timings[padded_to], timings[UNPADDED]),
        }
        for padded_to in forwards
    ]
