"""Hooks that downstream projects implement in their ``conftest.py``.

pytest-hotswap calls them through pluggy; each docstring carries a working example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_hotswap.implementations import Implementation
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.pipelines import PipelineSpec
    from pytest_hotswap.watch import CompileEvent


@pytest.hookspec(firstresult=True)
def pytest_hotswap_build_pipeline(name: str, options: HotswapOptions) -> PipelineSpec | None:
    """Build the pipeline called ``name`` (one of ``--hotswap-pipelines``) instead of the tiny default.

    Return ``None`` to leave ``name`` to the next implementation (the registered ``sd`` and
    ``flux`` pipelines, saved pipeline folders and cached hub ids are built last). Return a ``pytest_hotswap.pipelines.PipelineSpec``: the built model, not
    yet adapted or compiled. The fixtures then prepare it for hotswap, load the first adapter,
    quantize, compile and warm it up exactly as for the tiny pipelines. Without a diffusers
    ``pipe``, adapters go through PEFT, so any ``nn.Module`` works::

        # conftest.py
        import torch
        from pytest_hotswap.pipelines import PipelineSpec

        def pytest_hotswap_build_pipeline(name, options):
            if name != "mlp":
                return None
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)
            ).to(options.device, getattr(torch, options.dtype))
            x = torch.ones(2, 8, device=options.device, dtype=getattr(torch, options.dtype))
            return PipelineSpec(name="mlp", denoiser=model, run=lambda: model(x))

    Run with ``pytest --hotswap-pipelines=mlp``; ``lora_factory(hotswap_pipeline)`` writes
    adapters for it.
    """


def pytest_hotswap_recompile(item: pytest.Item, event: CompileEvent) -> None:
    """Called for every failing event seen while ``item`` ran (setup or call): recompiles, and
    every other kind ``no_recompile`` fails on (``event.kind``: ``"recompile"``, ``"storm"``,
    ``"cache_switch"``, ``"layout_change"``, ``"cudagraph_rerecord"``, ``"cudagraph_skip"``,
    ``"unobserved"``).

    It is called after the test's call (or at teardown when setup failed), never from inside
    dynamo, so a hook that raises cannot break a compile; the call report is not made yet, so a
    report section added here shows with the test.

    ``event.reasons`` holds dynamo's guard-failure texts and ``event.step`` the label of the swap
    the recompile followed. A layout change and the recompile it caused are one event:
    ``event.caused`` describes that recompile and ``event.guards`` its failed guards.
    ``event.stopped_at_guard`` is true when ``no_recompile`` refused the recompile at its guard
    (the allowance was spent), so nothing compiled and the test ended there::

        # conftest.py
        def pytest_hotswap_recompile(item, event):
            item.add_report_section("call", "recompiles", f"{event.compile_id}: {event.reasons}")
    """


def pytest_hotswap_report(report: dict[str, Any]) -> None:
    """Inspect or extend the JSON report (a plain dict) before it is written to ``--hotswap-report``::

    # conftest.py
    import os

    def pytest_hotswap_report(report):
        report["ci"] = {"commit": os.environ.get("GITHUB_SHA", "local")}
    """


def pytest_hotswap_implementations(config: pytest.Config) -> list[Implementation]:
    """Add hotswap implementations to ``--hotswap-implementations`` (results are concatenated).

    Subclass ``pytest_hotswap.implementations.Implementation`` and say how it swaps and sets
    strength; the fixtures, the conformance suite and the reports then treat it like the built-in
    ``diffusers``, ``peft`` and ``reference``::

        # conftest.py
        from pytest_hotswap.implementations import ReferenceImplementation

        class Audited(ReferenceImplementation):
            name = "audited"

            def swap(self, spec, lora, *, slot=0):
                audit_log.append(str(lora))
                super().swap(spec, lora, slot=slot)

        def pytest_hotswap_implementations(config):
            return [Audited()]

    Run with ``pytest --hotswap-implementations=audited,reference``.
    """
