"""Terminal summary, JSON report, baseline check and xdist transport (pytest glue).

The data and its lines live in ``pytest_hotswap.report``; this module only decides when to
collect, write, compare and print. Under pytest-xdist each worker sends its records to the
controller as plain dicts in ``config.workeroutput``; the controller merges them in
``pytest_testnodedown``, so the summary, the JSON and the baseline check match a serial run.
"""

from __future__ import annotations

import pytest

from pytest_hotswap.options import HotswapOptions
from pytest_hotswap.report import (
    DEFAULT_FAIL_ON,
    Comparison,
    Report,
    ReportError,
    TestRecord,
    check_writable,
    compare,
    parse_fail_on,
    write_json,
)

WORKEROUTPUT_KEY = "pytest_hotswap_records"
#: The record fields each watched test adds to its JUnit XML properties.
JUNIT_PROPERTIES = ("compiles", "recompiles", "cache_switches", "layout_changes", "graph_breaks")


class HotswapReporter:
    """Registered by the core plugin in ``pytest_configure`` as ``hotswap-reporter``.

    Built at configure time, so a bad ``--hotswap-fail-on``, an unreadable or malformed
    ``--hotswap-baseline`` and a ``--hotswap-report`` that cannot be written are usage errors
    before any test runs.
    """

    def __init__(self, config: pytest.Config, options: HotswapOptions) -> None:
        self.config = config
        self.options = options
        self.records: list[TestRecord] = []
        self.xdist_workers = 0
        self.report: Report | None = None
        self.comparison: Comparison | None = None
        self.baseline: Report | None = None
        if options.fail_on and options.baseline is None:
            raise pytest.UsageError(
                f"--hotswap-fail-on={options.fail_on} needs a report to compare with: "
                "add --hotswap-baseline=PATH (a JSON file written by --hotswap-report)"
            )
        try:
            self.thresholds = parse_fail_on(options.fail_on or DEFAULT_FAIL_ON)
        except ValueError as error:
            raise pytest.UsageError(f"--hotswap-fail-on={options.fail_on}: {error}") from None
        if options.baseline is not None and not self.is_worker:
            try:
                self.baseline = Report.load(options.baseline)
            except ReportError as error:
                raise pytest.UsageError(
                    f"--hotswap-baseline: {error}. Write one with --hotswap-report=PATH"
                ) from None
        if options.report is not None and not self.is_worker:
            try:
                check_writable(options.report)
            except ReportError as error:
                raise pytest.UsageError(f"--hotswap-report: {error}") from None
        if config.pluginmanager.hasplugin("xdist"):
            config.pluginmanager.register(XdistRecords(self), "hotswap-xdist")

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    def add_record(self, record: TestRecord, item: pytest.Item | None = None) -> None:
        """Called once per watched test, after its teardown.

        The JUnit XML properties go on ``item.user_properties`` here, before the teardown report
        is made, so they travel with it (also from xdist workers).
        """
        from pytest_hotswap.plugin.scale import device_label

        record.device = record.device or device_label(self.config)
        self.records.append(record)
        if item is not None:
            item.user_properties.extend((name, getattr(record, name)) for name in JUNIT_PROPERTIES)
            item.user_properties.append(("compile_s", round(record.compile_s, 3)))
            item.user_properties.append(("swap_ms", round(sum(s.ms for s in record.swaps), 3)))
            item.user_properties.append(("device", record.device))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.is_worker:
            self.config.workeroutput[WORKEROUTPUT_KEY] = [r.to_dict() for r in self.records]  # type: ignore[attr-defined]
            return
        self.report = Report.new(self.records, xdist_workers=self.xdist_workers)
        if self.options.report is not None:
            data = self.report.to_dict()
            self.config.hook.pytest_hotswap_report(report=data)
            write_json(self.options.report, data)
        if self.baseline is not None and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.TESTS_FAILED,
        ):
            self.comparison = compare(self.baseline, self.report, self.thresholds)
            if self.comparison.failed:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.report is None:
            return
        if self.report.tests or self.comparison is not None:
            terminalreporter.write_sep("=", "hotswap summary")
            from pytest_hotswap.scale import per_device_lines

            for line in [*self.report.summary_lines(), *per_device_lines(self.report.tests)]:
                terminalreporter.write_line(line)
        if self.comparison is not None:
            failed = self.comparison.failed
            terminalreporter.write_sep(
                "-", f"hotswap baseline {self.options.baseline}", red=failed, green=not failed
            )
            for line in self.comparison.lines():
                terminalreporter.write_line(line)
        if self.options.report is not None:
            terminalreporter.write_line(f"hotswap report written to {self.options.report}")


class XdistRecords:
    """Controller-side hooks that exist only when pytest-xdist is installed."""

    def __init__(self, reporter: HotswapReporter) -> None:
        self.reporter = reporter

    def pytest_testnodedown(self, node: object, error: object) -> None:
        # A crashed worker may have no workeroutput; its tests are reported failed by xdist.
        output = getattr(node, "workeroutput", {})
        self.reporter.xdist_workers += 1
        for data in output.get(WORKEROUTPUT_KEY, []):
            self.reporter.records.append(TestRecord.from_dict(data))
