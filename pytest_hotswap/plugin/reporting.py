"""Terminal summary, JSON report, baseline check and xdist transport (pytest glue).

(Interface stub: the reporting work owns and completes this module.)
"""

from __future__ import annotations

import pytest

from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.report import TestRecord


class HotswapReporter:
    """Registered by the core plugin in ``pytest_configure`` as ``hotswap-reporter``."""

    def __init__(self, config: pytest.Config, options: HotswapOptions) -> None:
        self.config = config
        self.options = options
        self.records: list[TestRecord] = []

    def add_record(self, record: TestRecord) -> None:
        """Called by the core plugin once per watched test, after its teardown."""
        self.records.append(record)
