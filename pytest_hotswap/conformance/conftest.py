"""Helpers of the conformance suite and its scenario x pipeline x implementation matrix."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

#: Scenario (test function ``test_<name>``) -> the label in the matrix, in matrix order.
SCENARIOS = {
    "same_rank": "same rank",
    "lower_rank": "lower rank",
    "rank_equals_max": "rank == max rank",
    "rank_over_max": "rank > max rank (rejected)",
    "different_alpha": "different alpha",
    "subset_targets": "subset of targets",
    "superset_targets": "superset of targets (rejected)",
    "text_encoder_keys": "text-encoder keys (rejected)",
    "conv2d": "conv2d LoRA",
    "quantized_base": "quantized base",
    "a_b_a": "A -> B -> A identical",
    "long_sequence": "50 swaps",
    "strength_change": "LoRA strength change",
}

#: Verdicts in the matrix, from a test report.
PASS, DEFECT, FAIL, FIXED, NA, ERROR = "pass", "upstream defect", "FAIL", "XPASS", "n/a", "ERROR"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every tensor of a pipeline's denoiser and text encoders, its LoRA scalings and configs."""

    tensors: dict[str, Any]
    scalings: dict[str, Any]
    configs: dict[str, str]

    def differences(self, other: Snapshot) -> list[str]:
        import torch

        diffs = [f"tensor {k} added or removed" for k in self.tensors.keys() ^ other.tensors.keys()]
        for key in self.tensors.keys() & other.tensors.keys():
            a, b = self.tensors[key], other.tensors[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                diffs.append(f"{key}: {tuple(a.shape)} {a.dtype} -> {tuple(b.shape)} {b.dtype}")
            elif not torch.equal(a, b):
                diffs.append(f"{key}: values changed")
        for key in self.scalings.keys() | other.scalings.keys():
            if repr(self.scalings.get(key)) != repr(other.scalings.get(key)):
                diffs.append(
                    f"scaling {key}: {self.scalings.get(key)} -> {other.scalings.get(key)}"
                )
        if self.configs != other.configs:
            diffs.append(f"adapter configs changed: {self.configs} -> {other.configs}")
        return diffs


def snapshot(pipeline: Any) -> Snapshot:
    """A bit-exact copy of what a failed swap must leave untouched (base weights included)."""
    import torch

    modules = {"denoiser": pipeline.denoiser}
    pipe = pipeline.pipe
    for name in ("text_encoder", "text_encoder_2"):
        component = getattr(pipe, name, None) if pipe is not None else None
        if isinstance(component, torch.nn.Module):
            modules[name] = component
    tensors: dict[str, Any] = {}
    scalings: dict[str, Any] = {}
    configs: dict[str, str] = {}
    for prefix, module in modules.items():
        module = getattr(module, "_orig_mod", module)
        for key, value in module.state_dict(keep_vars=False).items():
            plain = value.dequantize() if hasattr(value, "dequantize") else value
            tensors[f"{prefix}.{key}"] = plain.detach().clone()
        for name, sub in module.named_modules():
            scaling = getattr(sub, "scaling", None)
            if isinstance(scaling, dict):
                for adapter, value in scaling.items():
                    value = value.detach().clone() if isinstance(value, torch.Tensor) else value
                    scalings[f"{prefix}.{name}[{adapter}]"] = value
        configs[prefix] = repr(getattr(module, "peft_config", None))
    return Snapshot(tensors, scalings, configs)


def eager_output(config: pytest.Config, pipeline: Any, lora: Any, scale: float = 1.0) -> Any:
    """The output of a fresh, uncompiled, unpadded pipeline with ``lora`` loaded the plain way."""
    import torch

    from pytest_hotswap import pipelines

    options = pipeline.options
    spec = config.hook.pytest_hotswap_build_pipeline(name=pipeline.name, options=options)
    pipelines.load_first_adapter(spec, lora)
    pipelines.quantize_denoiser(spec.denoiser, options.quantize)
    if scale != 1.0:
        _set_strength_the_plain_way(spec, scale)
    with torch.no_grad():
        return spec.run()


def _set_strength_the_plain_way(spec: Any, scale: float) -> None:
    """diffusers' ``set_adapters`` for a pipeline, PEFT's ``set_scale`` for a bare model."""
    from pytest_hotswap.pipelines import ADAPTER_NAME

    if spec.pipe is not None and hasattr(spec.pipe, "set_adapters"):
        spec.pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
        return
    from peft.tuners.lora import LoraLayer

    for module in spec.denoiser.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER_NAME, scale)


def assert_same_output(actual: Any, expected: Any, dtype: str) -> None:
    """Equal within the dtype's tolerance: padding with zeros changes only summation order."""
    import torch

    __tracebackhide__ = True
    atol, rtol = (1e-4, 1e-3) if dtype == "float32" else (2e-2, 2e-2)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# --- The matrix ------------------------------------------------------------------------------


def _verdict(report: pytest.TestReport) -> str | None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            return DEFECT if report.skipped else FIXED
        if report.passed:
            return PASS
        if report.skipped:
            return NA
        if report.failed and report.longreprtext.lstrip().startswith("[XPASS(strict)]"):
            return FIXED
        return FAIL if report.when == "call" else ERROR
    return None


def _cell(nodeid: str) -> tuple[str, str] | None:
    """``.../test_conformance.py::test_same_rank[sd-diffusers]`` -> (same_rank, sd-diffusers)."""
    if "::test_" not in nodeid or "[" not in nodeid:
        return None
    name, _, param = nodeid.rsplit("::", 1)[1].partition("[")
    scenario = name.removeprefix("test_")
    return (scenario, param.rstrip("]")) if scenario in SCENARIOS else None


class ConformanceMatrix:
    """Collects a verdict per (scenario, pipeline-implementation) cell from the test reports.

    Test reports reach the controller under pytest-xdist too, so the matrix is the same with or
    without ``-n``.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cells: dict[tuple[str, str], str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        cell, verdict = _cell(report.nodeid), _verdict(report)
        # The first verdict that is not a pass sticks (a teardown error after a pass, say).
        if cell is not None and verdict is not None and self.cells.get(cell, PASS) == PASS:
            self.cells[cell] = verdict

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.cells:
            write_matrix(terminalreporter, self.cells, self.config)

    def pytest_hotswap_report(self, report: dict[str, Any]) -> None:
        if self.cells:
            columns, rows = matrix_rows(self.cells)
            report["conformance"] = {
                "columns": columns,
                "rows": [
                    {"scenario": r[0], "results": dict(zip(columns, r[1:], strict=True))}
                    for r in rows
                ],
            }


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ConformanceMatrix(config), "hotswap-conformance-matrix")


def matrix_rows(cells: dict[tuple[str, str], str]) -> tuple[list[str], list[list[str]]]:
    columns = sorted({column for _, column in cells}, key=_column_order)
    rows = [
        [label, *(cells.get((scenario, column), "-") for column in columns)]
        for scenario, label in SCENARIOS.items()
        if any((scenario, column) in cells for column in columns)
    ]
    return columns, rows


def _column_order(column: str) -> tuple[int, str]:
    name = column.rsplit("-", 1)[0]
    return ({"sd": 0, "flux": 1}.get(name, 2), column)


def write_matrix(tr: Any, cells: dict[tuple[str, str], str], config: pytest.Config) -> None:
    from pytest_hotswap.plugin import OPTIONS_KEY

    options = config.stash[OPTIONS_KEY]
    columns, rows = matrix_rows(cells)
    table = [["scenario", *columns], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns) + 1)]
    tr.section("hotswap conformance matrix")
    tr.write_line(
        f"backend={options.backend} mode={options.mode} max_rank={options.max_rank} "
        f"device={options.device} dtype={options.dtype} quantize={options.quantize}"
    )
    for row in table:
        line = "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        tr.write_line(
            line, red=any(c in (FAIL, FIXED, ERROR) for c in row[1:]), bold=row is table[0]
        )
    tr.write_line(
        f"{PASS}: no recompile and the output of a fresh eager load (or rejected, model untouched); "
        f"{DEFECT}: known upstream defect, xfail(strict); {FIXED}: a known defect no longer "
        "reproduces, update the suite; n/a: the pipeline has no such layers"
    )
