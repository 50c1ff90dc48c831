"""What a downstream repo adds to use pytest-hotswap: its own model, and a CI-friendly recompile line.

The options live in ``pytest.ini``; the plugin itself is loaded by its entry point, nothing to add.
"""

from __future__ import annotations

import os

import pytest
import torch
from tinydenoiser import build_denoiser, denoiser_inputs, sample

from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.pipelines import PipelineSpec
from pytest_hotswap.watch import CompileEvent, shorten_reason


def pytest_hotswap_build_pipeline(name: str, options: HotswapOptions) -> PipelineSpec | None:
    """Build "tinydenoiser" for ``--hotswap-pipelines``; other names go to the built-in builders.

    Return the model as built: the fixtures load the first adapter through PEFT (there is no
    diffusers ``pipe``), pad it to ``--hotswap-max-rank``, compile and warm it up.
    """
    if name != "tinydenoiser":
        return None
    device, dtype = options.device, getattr(torch, options.dtype)
    model = build_denoiser(seed=0, device=device, dtype=dtype)
    return PipelineSpec(
        name=name,
        denoiser=model,
        run=lambda **kw: sample(model, device=device, dtype=dtype, **kw),
        inputs=lambda: denoiser_inputs(device=device, dtype=dtype),
    )


def pytest_hotswap_recompile(item: pytest.Item, event: CompileEvent) -> None:
    """One line per failing event as it happens (a recompile, or a swap that re-shaped a LoRA
    tensor); a warning annotation on the PR under GitHub Actions."""
    terminal = item.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is None:  # an xdist worker: the controller's summary lists the recompile
        return
    what = event.kind.replace("_", " ")
    detail = shorten_reason(event.reasons[0]) if event.reasons else "no reason reported"
    if event.guards:  # a layout change carries the recompile it caused
        detail += f"; then {event.caused}: {shorten_reason(event.guards[0])}"
    message = f"{item.nodeid}: {what} {event.compile_id} after {event.step!r}: {detail}"
    if os.environ.get("GITHUB_ACTIONS") == "true":
        path, line = item.location[0], item.location[1] + 1
        message = f"::warning file={path},line={line},title=hotswap {what}::{message}"
    terminal.write_line(message)
