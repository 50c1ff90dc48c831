"""Per-test compile records, the JSON report and the baseline comparison. No pytest, no torch.

The report is plain data so that CI can keep it as an artifact and compare a later run against it,
with the plugin (``--hotswap-baseline``) or offline (``pytest-hotswap compare``). Its JSON schema
carries ``schema_version``; a change of meaning bumps it and an old file is refused by name.
Every field is checked on load: a file of the wrong shape is a :class:`ReportError` naming the
test and the field, never a traceback and never a silently passing comparison.

One module per job: :mod:`.records` (the records and their checks), :mod:`.files` (the report,
its JSON and the files it is written to), :mod:`.comparison` (thresholds and the baseline
comparison), :mod:`.tables` (plain-text tables).
"""

from __future__ import annotations

from pytest_hotswap.report.comparison import (
    DEFAULT_FAIL_ON,
    NOT_COMPARED_OUTCOMES,
    Comparison,
    Regression,
    Threshold,
    compare,
    parse_fail_on,
)
from pytest_hotswap.report.files import Report, check_writable, installed_versions, write_json
from pytest_hotswap.report.records import (
    METRICS,
    OUTCOMES,
    SCHEMA_VERSION,
    ReportError,
    SwapRecord,
    TestRecord,
)
from pytest_hotswap.report.tables import format_table

__all__ = [
    "DEFAULT_FAIL_ON",
    "METRICS",
    "NOT_COMPARED_OUTCOMES",
    "OUTCOMES",
    "SCHEMA_VERSION",
    "Comparison",
    "Regression",
    "Report",
    "ReportError",
    "SwapRecord",
    "TestRecord",
    "Threshold",
    "check_writable",
    "compare",
    "format_table",
    "installed_versions",
    "parse_fail_on",
    "write_json",
]
