"""Hooks that downstream projects implement in their ``conftest.py``.

pytest-hotswap calls them through pluggy; each docstring carries a working example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_hotswap.options import HotswapOptions
    from pytest_hotswap.watch import CompileEvent


@pytest.hookspec(firstresult=True)
def pytest_hotswap_build_pipeline(name: str, options: HotswapOptions) -> Any | None:
    """Build the pipeline called ``name`` (one of ``--hotswap-pipelines``) instead of the tiny default.

    Return ``None`` to leave ``name`` to the next implementation (the built-in ``sd`` and ``flux``
    builders run last). Return a ``pytest_hotswap.pipelines.PipelineSpec`` describing your model;
    the fixtures then prepare it for hotswap, load the first adapter, quantize, compile and warm it
    up exactly as for the tiny pipelines::

        # conftest.py
        from pytest_hotswap.pipelines import PipelineSpec

        def pytest_hotswap_build_pipeline(name, options):
            if name != "mymodel":
                return None
            model = MyDenoiser().to(options.device)
            return PipelineSpec(name="mymodel", pipe=None, denoiser=model,
                                call=lambda pipe, denoiser, **kw: denoiser(torch.ones(1, 8)))
    """


def pytest_hotswap_recompile(item: pytest.Item, event: CompileEvent) -> None:
    """Called for every recompile seen while ``item`` ran (setup or call), as it is recorded.

    ``event.reasons`` holds dynamo's guard-failure texts and ``event.step`` the label of the swap
    the recompile followed::

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
