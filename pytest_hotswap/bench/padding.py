"""Measurement 3: what the zeros cost. Eager forward time at the adapter's true rank, unpadded,
against the same adapter padded to each rank in ``PADDED_RANKS``, on the Flux-shaped models."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from pytest_hotswap import pipelines
from pytest_hotswap.bench import models
from pytest_hotswap.bench.config import BenchConfig
from pytest_hotswap.bench.results import Result
from pytest_hotswap.bench.timing import median_ms

TRUE_RANK = 16
PADDED_RANKS = (16, 64, 128, 256)


def run(config: BenchConfig, workdir: Path) -> Result:
    result = Result(
        "padding_overhead",
        f"Padding overhead: eager forward, rank-{TRUE_RANK} LoRA unpadded vs padded (median ms)",
    )
    for shape in models.flux_shapes(config.smoke)[1:]:
        result.rows += _measure(shape, config, workdir)
        gc.collect()
    return result


def _measure(shape: models.FluxShape, config: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    model = models.build_flux(shape, config)
    pipelines.quantize_denoiser(model, config.quantize)
    forward = models.forward(model, models.flux_call(shape, config))
    lora = models.make_adapter(model, TRUE_RANK, config.seed, workdir, config)
    rows: list[dict[str, Any]] = []
    for padded_to in (None, *PADDED_RANKS):
        if padded_to is not None:
            model.unload_lora()
        models.load_adapter(model, lora, padded_to)
        forward_ms = median_ms(forward, config.device, config.repeats)
        rows.append(
            {
                "model": shape.label,
                "padded_to": padded_to or "none",
                "forward_ms": forward_ms,
                "x_unpadded": forward_ms / rows[0]["forward_ms"] if rows else 1.0,
            }
        )
    return rows
