"""The conformance suite's library: verdicts and their matrix, known defects as xfails, snapshots
of a model, the eager output a swap must equal, and the catalog scenario's cases.

The suite's conftest holds its hooks and fixtures only; they and the scenarios import from here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import pytest

from pytest_hotswap.stacks import KnownDefect, describe_stack, installed_stack, stack_verdict

#: Scenario (test function ``test_<name>``) -> the label in the matrix, in matrix order.
SCENARIOS = {
    "same_rank": "same rank",
    "lower_rank": "lower rank",
    "rank_equals_max": "rank == max rank",
    "rank_over_max": "rank > max rank (rejected)",
    "different_alpha": "different alpha",
    "subset_targets": "subset of targets",
    "per_layer_ranks": "per-layer ranks (rank_pattern)",
    "superset_targets": "superset of targets (rejected)",
    "disjoint_targets": "disjoint targets (union padding)",
    "text_encoder_keys": "text-encoder keys (rejected)",
    "text_encoder_hotswap": "text-encoder hotswap (opt-in)",
    "conv2d": "conv2d LoRA",
    "quantized_base": "quantized base",
    "a_b_a": "A -> B -> A identical",
    "long_sequence": "50 swaps",
    "strength_change": "LoRA strength change",
    "two_adapters": "two adapters, weights changed",
    "slot_off_on": "slot switched off and on",
    "catalog": "catalog",
}

#: Verdicts in the matrix, from a test report.
PASS, DEFECT, FAIL, FIXED, NA, ERROR = "pass", "upstream defect", "FAIL", "XPASS", "n/a", "ERROR"
UNSUPPORTED, MAYBE_FIXED, UNVERIFIED_DEFECT = (
    "not supported",
    "fixed upstream?",
    "defect (unverified)",
)
#: The user property a test sets to show its own verdict (a refused catalog file, say).
VERDICT_PROPERTY = "hotswap_verdict"
_RED = (FAIL, FIXED, ERROR)


class NotRejectedError(AssertionError):
    """An adapter that cannot be hotswapped was accepted."""


class ModelChangedError(AssertionError):
    """A swap that raised left the model changed."""


class WrongOutputError(AssertionError):
    """The hotswapped pipeline's output differs from a fresh eager load of the same adapter."""


#: How each kind of known defect shows up in a test: the exception ``xfail(raises=...)`` expects.
FAILURE_EXCEPTIONS: dict[str, type[BaseException]] = {
    KnownDefect.NOT_REJECTED: NotRejectedError,
    KnownDefect.MODEL_CHANGED: ModelChangedError,
    KnownDefect.RECOMPILES: pytest.fail.Exception,  # raised by no_recompile only
    KnownDefect.WRONG_OUTPUT: WrongOutputError,
}


#: The backend a known-defect cell compiles with when the session's is another one. How each
#: defect shows does not depend on the backend: dynamo's guards decide a recompile the same way
#: for every backend (``recompiles``), and a refusal, a changed model or a wrong scaling
#: (``not rejected``, ``model changed``, ``wrong output``) happen in the swap, before any compiled
#: code runs. So these cells pay eager's seconds instead of inductor's minutes (compiling on to
#: a wrong output included), and never break the session backend's shared pipeline for the
#: scenarios that pass on it.
DEFECT_BACKEND = "eager"


def expect_defect(request: pytest.FixtureRequest, defect: KnownDefect) -> dict[str, Any]:
    """Mark the running test with a known defect; returns the build overrides its pipelines take
    (``backend=DEFECT_BACKEND``), also applied to the test's ``hotswap_pipeline`` when this runs
    before that fixture is set up (the suite's autouse fixture).

    On a stack inside the defect's verified ranges it is a strict xfail with the documented
    failure: a fixed upstream turns the run red. Outside them it is not strict: a defect that no
    longer reproduces shows as "fixed upstream?" and passes; any other failure still fails.
    """
    verified = defect.verified_on()
    reason = (
        defect.reason if verified else f"{defect.reason} [verified on {defect.describe_range()}]"
    )
    request.applymarker(
        pytest.mark.xfail(reason=reason, raises=FAILURE_EXCEPTIONS[defect.failure], strict=verified)
    )
    request.node.user_properties.append(("hotswap_defect_verified", verified))
    if defect.failure != KnownDefect.RECOMPILES:
        # It shows after any recompile the scenario also makes (flux's two adapters recompile on
        # a new weight, then give the wrong output): compile on to reach it, as before.
        from pytest_hotswap.plugin.session import compile_on

        compile_on(request.node)
    request.node.add_marker(pytest.mark.hotswap(backend=DEFECT_BACKEND))
    request.node.user_properties.append(("hotswap_defect_backend", DEFECT_BACKEND))
    return {"backend": DEFECT_BACKEND}


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

    from pytest_hotswap.reference.components import unwrap_compiled

    modules = {"denoiser": pipeline.denoiser, **pipeline.spec.text_encoders()}
    tensors: dict[str, Any] = {}
    scalings: dict[str, Any] = {}
    configs: dict[str, str] = {}
    for prefix, module in modules.items():
        module = unwrap_compiled(module)
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


def eager_output(
    config: pytest.Config,
    pipeline: Any,
    loras: Sequence[tuple[Any, float]] | Any,
    scale: float = 1.0,
) -> Any:
    """The output of a fresh, uncompiled, unpadded pipeline with the adapters loaded the plain way.

    ``loras`` is one adapter (at strength ``scale``) or ``(adapter, weight)`` pairs, loaded as
    separate adapters and combined with diffusers' ``set_adapters`` (PEFT's scales for a model
    without a diffusers pipeline). One eager pipeline per configuration is built and reused: its
    adapters are unloaded again after each call (a bare model is built anew each time).
    """

    from pytest_hotswap.plugin.fixtures import session_of

    pairs = list(loras) if isinstance(loras, list) else [(loras, scale)]
    session = session_of(config)
    outputs = _EAGER_OUTPUTS.setdefault(id(session), {})
    source = pipeline.source or pipeline.name
    # What the plain pipeline depends on: not the backend, padding or compile scope of the
    # compiled one it is compared with (a known-defect cell compiles with another backend).
    options = pipeline.options
    plain = (source, options.device, options.dtype, options.quantize)
    key = (*plain, tuple((str(lora), weight) for lora, weight in pairs))
    if key in outputs:
        return outputs[key]
    started = time.perf_counter()
    try:
        return _run_plain(session, source, options, plain, pairs, outputs, key)
    finally:
        EAGER_SECONDS[0] += time.perf_counter() - started


def _run_plain(
    session: Any,
    source: str,
    options: Any,
    plain: tuple[Any, ...],
    pairs: list[tuple[Any, float]],
    outputs: dict[Any, Any],
    key: tuple[Any, ...],
) -> Any:
    import torch

    from pytest_hotswap import pipelines

    spec = _EAGER_SPECS.get((id(session), *plain))
    if spec is None:
        spec = session.build_spec(source, options)
        for denoiser in spec.denoisers:  # as the compiled pipeline: Wan 2.2's experts both
            pipelines.quantize_denoiser(denoiser, options.quantize)
        if spec.has_lora_loader:  # reusable: its adapters can be unloaded
            _EAGER_SPECS[(id(session), *plain)] = spec
    names = []
    try:
        for index, (lora, _) in enumerate(pairs):
            name = pipelines.ADAPTER_NAME if index == 0 else f"adapter_{index}"
            _load_plain(spec, lora, name)
            names.append(name)
        weights = [weight for _, weight in pairs]
        if weights != [1.0]:
            _set_weights(spec, names, weights)
        with torch.no_grad():
            outputs[key] = spec.run()
    finally:
        if spec.has_lora_loader:
            spec.pipe.unload_lora_weights()
    return outputs[key]


_EAGER_OUTPUTS: dict[int, dict[Any, Any]] = {}
#: Seconds this process spent building and running eager references (the time split).
EAGER_SECONDS = [0.0]
_EAGER_SPECS: dict[tuple[Any, ...], Any] = {}


def _load_plain(spec: Any, lora: Any, name: str) -> None:
    from pytest_hotswap import pipelines

    pipelines.load_first_adapter(spec, lora, name)  # every denoiser the loader reaches


def _set_weights(spec: Any, names: list[str], weights: list[float]) -> None:
    """diffusers' ``set_adapters`` for a pipeline, PEFT's ``set_scale`` for a bare model."""
    if spec.pipe is not None and hasattr(spec.pipe, "set_adapters"):
        spec.pipe.set_adapters(names, adapter_weights=weights)
        return
    from peft.tuners.lora import LoraLayer

    for module in spec.denoiser.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights, strict=True):
                module.set_scale(name, weight)


def assert_same_output(actual: Any, expected: Any, dtype: str) -> None:
    """Equal within the dtype's tolerance: padding with zeros changes only summation order."""
    import torch

    __tracebackhide__ = True
    atol, rtol = (1e-4, 1e-3) if dtype == "float32" else (2e-2, 2e-2)
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as error:
        raise WrongOutputError(f"not the output of a fresh eager load: {error}") from None


# --- The matrix ------------------------------------------------------------------------------


def _verdict(report: pytest.TestReport) -> str | None:
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return None
    own = dict(report.user_properties).get(VERDICT_PROPERTY)
    verified = dict(report.user_properties).get("hotswap_defect_verified", True)
    if hasattr(report, "wasxfail"):
        if report.skipped:
            return DEFECT if verified else UNVERIFIED_DEFECT
        return MAYBE_FIXED if report.passed else FIXED
    if report.passed:
        return own or PASS
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        return UNSUPPORTED if "not supported" in reason else NA
    if report.failed and report.longreprtext.lstrip().startswith("[XPASS(strict)]"):
        return FIXED
    return FAIL if report.when == "call" else ERROR


def _cell(report: pytest.TestReport) -> tuple[str, str] | None:
    """``.../test_conformance.py::test_same_rank[sd-diffusers]`` -> (same rank, sd-diffusers)."""
    nodeid = report.nodeid
    if "::test_" not in nodeid or "[" not in nodeid:
        return None
    name, _, param = nodeid.rsplit("::", 1)[1].partition("[")
    scenario = name.removeprefix("test_")
    if scenario not in SCENARIOS:
        return None
    param = param.rstrip("]")
    if scenario == "catalog":  # [sd-reference-style.safetensors]: one row per file
        column, _, file = param.partition("|")
        return f"catalog: {file}", column
    return SCENARIOS[scenario], param


MATRIX_PLUGIN = "hotswap-conformance-matrix"


def register_matrix(config: pytest.Config) -> None:
    """Keep the matrix in this process, once: the suite's conftest does it where it collects, and
    the plugin on a pytest-xdist controller, which loads no conftest of the suite (its workers
    collect) but receives every test report."""
    if config.pluginmanager.get_plugin(MATRIX_PLUGIN) is None:
        config.pluginmanager.register(ConformanceMatrix(config), MATRIX_PLUGIN)


class ConformanceMatrix:
    """Collects a verdict per (scenario, pipeline-implementation) cell from the test reports.

    Test reports reach the controller under pytest-xdist too, so the matrix is the same with or
    without ``-n``.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.cells: dict[tuple[str, str], str] = {}
        self.split = TimeSplit()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.split.add(report)
        cell, verdict = _cell(report), _verdict(report)
        # The first verdict that is not a pass sticks (a teardown error after a pass, say).
        if cell is not None and verdict is not None and self.cells.get(cell, PASS) == PASS:
            self.cells[cell] = verdict

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.cells:
            write_matrix(terminalreporter, self.cells, self.config)
            terminalreporter.write_line(self.split.describe())

    def pytest_hotswap_report(self, report: dict[str, Any]) -> None:
        if self.cells:
            columns, rows = matrix_rows(self.cells)
            report["conformance"] = {
                "stack": installed_stack(),
                "columns": columns,
                "rows": [
                    {"scenario": r[0], "results": dict(zip(columns, r[1:], strict=True))}
                    for r in rows
                ],
                "seconds": self.split.as_dict(),
            }


#: The user property with the seconds a test spent on eager references (set at its teardown).
EAGER_PROPERTY = "hotswap_eager_s"


def take_eager_seconds() -> float:
    """The eager-reference seconds since the last call (one test's, called at its teardown)."""
    seconds, EAGER_SECONDS[0] = EAGER_SECONDS[0], 0.0
    return round(seconds, 3)


@dataclasses.dataclass
class TimeSplit:
    """Where the suite's test time went, summed over every test (and every xdist worker) from
    the test reports: compiling and swapping (the plugin's own records), the eager references
    the outputs are compared with, and the rest (building pipelines, fixtures, running)."""

    tests: float = 0.0
    compiling: float = 0.0
    swapping: float = 0.0
    eager: float = 0.0

    def add(self, report: pytest.TestReport) -> None:
        self.tests += report.duration
        if report.when == "teardown":
            properties = dict(report.user_properties)
            self.compiling += float(properties.get("compile_s", 0.0))
            self.swapping += float(properties.get("swap_ms", 0.0)) / 1000
            self.eager += float(properties.get(EAGER_PROPERTY, 0.0))

    def as_dict(self) -> dict[str, float]:
        rest = self.tests - self.compiling - self.swapping - self.eager
        return {
            "tests": round(self.tests, 2),
            "compiling": round(self.compiling, 2),
            "swapping": round(self.swapping, 3),
            "eager references": round(self.eager, 2),
            "building, set-up and running": round(max(rest, 0.0), 2),
        }

    def describe(self) -> str:
        parts = self.as_dict()
        total = parts.pop("tests")
        shares = ", ".join(
            f"{name} {seconds:.1f} s ({100 * seconds / total:.0f}%)" if total else f"{name} 0 s"
            for name, seconds in parts.items()
        )
        return f"time in tests: {total:.1f} s summed over tests and workers: {shares}"


def matrix_rows(cells: dict[tuple[str, str], str]) -> tuple[list[str], list[list[str]]]:
    columns = sorted({column for _, column in cells}, key=_column_order)
    labels = list(SCENARIOS.values())
    scenarios = sorted(
        {scenario for scenario, _ in cells},
        key=lambda s: (labels.index(s) if s in labels else len(labels), s),
    )
    rows = [
        [scenario, *(cells.get((scenario, column), "-") for column in columns)]
        for scenario in scenarios
    ]
    return columns, rows


def _column_order(column: str) -> tuple[int, str]:
    """Registered pipelines first, in registry order, then any other (saved, hub) by name."""
    from pytest_hotswap.pipelines.registry import REGISTRY

    names = list(REGISTRY)
    name = column.rsplit("-", 1)[0]
    return (names.index(name) if name in names else len(names), column)


def write_matrix(tr: Any, cells: dict[tuple[str, str], str], config: pytest.Config) -> None:
    from pytest_hotswap.plugin.fixtures import session_of
    from pytest_hotswap.report import format_table

    session = session_of(config)
    options = session.resolved_options
    columns, rows = matrix_rows(cells)
    verified = _stack_verified(session)
    tr.section("hotswap conformance matrix")
    tr.write_line(f"stack: {describe_stack()} ({verified})")
    tr.write_line(options.describe())
    table = format_table(["scenario", *columns], rows, indent="")
    for index, line in enumerate(table):
        row = rows[index - 1] if index else None
        tr.write_line(
            line, red=row is not None and any(c in _RED for c in row[1:]), bold=index == 0
        )
    tr.write_line(
        f"{PASS}: no recompile and the output of a fresh eager load (or rejected, model untouched); "
        f"{DEFECT}: known upstream defect, xfail(strict); {FIXED}: a known defect no longer "
        f"reproduces on its verified stack, update the suite; {MAYBE_FIXED}: a known defect does "
        f"not reproduce on this unverified stack; {UNSUPPORTED}: the implementation cannot do it; "
        "n/a: the pipeline has no such layers"
    )
    if options.backend != DEFECT_BACKEND:
        tr.write_line(
            f"{DEFECT} cells compile with {DEFECT_BACKEND}: how a known defect shows does not "
            "depend on the backend (dynamo's guards, the swap's refusal, the model's state)"
        )


def _stack_verified(session: Any) -> str:
    defects = [d for name in session.options.implementations for d in _known(session, name)]
    return stack_verdict(defects)


def _known(session: Any, name: str) -> tuple[KnownDefect, ...]:
    try:
        return tuple(session.implementations[name].defects_for())
    except KeyError:
        return ()


# --- The catalog scenario ----------------------------------------------------------------------


@dataclasses.dataclass
class CatalogCase:
    """One file of the catalog on one pipeline with one implementation."""

    pipeline: str
    implementation: str
    entry: Any  # CatalogEntry
    first: Any  # the first usable file: loaded before compiling
    usable: list[Any]  # the files the pattern can take: their targets are padded (union)
    max_rank: int
    features: frozenset[str]
    diffusers: bool = True  # the pipeline loads adapters with diffusers' loaders

    def problem(self, implementation: Any) -> tuple[str | None, str, str] | None:
        """``(scenario of the matching known defect, reason, reference error)`` for a file this
        implementation must refuse, else ``None``."""
        from pytest_hotswap.adapters.header import PEFT_NATIVE
        from pytest_hotswap.implementations import FEATURE_TARGETS

        limit = self.entry.pattern_limit(self.max_rank, diffusers=self.diffusers)
        header = self.entry.header
        if limit is not None:
            if header is None:
                return None, limit.label, "InvalidAdapterError"
            if header.tuner != "LoRA":
                return "other_tuner", limit.label, "HotswapError"
            if limit.label == PEFT_NATIVE:
                return "peft_native_keys", limit.label, "HotswapError"
            if header.text_encoder_layers:
                return "text_encoder_keys", limit.label, "TextEncoderLoraError"
            return "rank_over_max", limit.label, "RankTooLargeError"
        if FEATURE_TARGETS not in implementation.features:
            extra = [k for k in header.denoiser_keys if k not in self.first.header.layers]
            if extra:
                reason = f"targets {len(extra)} layers beyond the first file"
                return "superset_targets", reason, "UnexpectedTargetsError"
        return None


GENERATED: dict[tuple[int, str], Any] = {}


def catalog_for(
    session: Any, pipeline: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, bool]:
    """The catalog to run on ``pipeline`` (the user's, else a small generated one of every key
    style and limit, written once per pipeline and session), and whether the pipeline loads
    adapters through diffusers."""
    from pytest_hotswap.adapters import make_catalog
    from pytest_hotswap.adapters.catalog import load_catalog

    key = (id(session), pipeline)
    if key not in GENERATED:
        spec = session.build_spec(pipeline, session.resolved_options)
        catalog = session.catalog
        if catalog is None:
            folder = tmp_path_factory.mktemp(f"catalog-{pipeline.replace('/', '_')}")
            make_catalog(spec.lora_target, folder)
            catalog = load_catalog(folder)
        GENERATED[key] = (catalog, spec.has_lora_loader)
    return GENERATED[key]
