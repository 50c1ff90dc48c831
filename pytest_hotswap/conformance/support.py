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

from pytest_hotswap.adapters.loading import AdapterLoadError
from pytest_hotswap.stacks import KnownDefect

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

#: Scenarios whose known defect is listed under another name (the feature they exercise).
DEFECT_SCENARIOS = {"per_layer_ranks": "rank_pattern"}

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
    KnownDefect.LOAD_FAILS: AdapterLoadError,  # raised by a plain load through the pipeline's loader
}


#: Known defects decided in the swap itself, before any compiled call: an adapter accepted that
#: must be refused, a failed swap that changed the model, a plain load that fails. A cell with
#: one builds the pipelines of its own uncompiled (``compiled=False``); should the defect not
#: show, :func:`assert_rejected` checks again on a compiled pipeline before the cell passes.
DECIDED_IN_THE_SWAP = frozenset(
    {KnownDefect.NOT_REJECTED, KnownDefect.MODEL_CHANGED, KnownDefect.LOAD_FAILS}
)

#: The backend a known-defect cell compiles with when the session's is another one. How each
#: defect shows does not depend on the backend: dynamo's guards decide a recompile the same way
#: for every backend (``recompiles``), and a refusal, a changed model or a wrong scaling
#: (``not rejected``, ``model changed``, ``wrong output``) happen in the swap, before any compiled
#: code runs. So these cells pay eager's seconds instead of inductor's minutes (compiling on to
#: a wrong output included), and never break the session backend's shared pipeline for the
#: scenarios that pass on it.
DEFECT_BACKEND = "eager"


def expect_defect(request: pytest.FixtureRequest, defect: KnownDefect) -> dict[str, Any]:
    """Mark the running test with a known defect; returns the build overrides the pipelines of
    its own take (``backend=DEFECT_BACKEND``, and ``compiled=False`` for a defect decided in the
    swap), also kept for :func:`defect_overrides`. The backend also applies to the test's
    ``hotswap_pipeline`` when this runs before that fixture is set up (the suite's autouse
    fixture); that one stays compiled: cells with other defects share it.

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
        # It shows after any recompile the scenario also makes (the two adapters recompile on a
        # new weight, then give the wrong output): the recompile is refused at its guard and
        # recorded, and the call runs again eagerly to reach the check, compiling nothing.
        from pytest_hotswap.plugin.session import run_eagerly_past_allowance

        run_eagerly_past_allowance(request.node)
    request.node.add_marker(pytest.mark.hotswap(backend=DEFECT_BACKEND))
    overrides: dict[str, Any] = {"backend": DEFECT_BACKEND}
    if defect.failure in DECIDED_IN_THE_SWAP:
        overrides["compiled"] = False
    request.node.stash[_OVERRIDES] = overrides
    return overrides


_OVERRIDES = pytest.StashKey[dict[str, Any]]()


def defect_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The build overrides :func:`expect_defect` gave the running test (none without a defect)."""
    return dict(request.node.stash.get(_OVERRIDES, {}))


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

    spec = _plain_spec(session, source, options, plain)
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


def _plain_spec(session: Any, source: str, options: Any, plain: tuple[Any, ...]) -> Any:
    """The plain pipeline of ``source``: built once per session and reused (its adapters are
    unloaded after each use); a bare model is built anew."""
    from pytest_hotswap import pipelines

    spec = _EAGER_SPECS.get((id(session), *plain))
    if spec is None:
        spec = session.build_spec(source, options)
        for denoiser in spec.denoisers:  # as the compiled pipeline: Wan 2.2's experts both
            pipelines.quantize_denoiser(denoiser, options.quantize)
        if spec.has_lora_loader:  # reusable: its adapters can be unloaded
            _EAGER_SPECS[(id(session), *plain)] = spec
    return spec


def plain_traits(config: pytest.Config, source: str, options: Any) -> frozenset[str]:
    """The traits (``adapters.loading.pipeline_traits``) of pipeline ``source``, read off the
    plain pipeline the eager references use: known before the cell's own pipeline is built, so a
    defect that needs a trait still gets its build overrides (``expect_defect``)."""
    from pytest_hotswap.adapters.loading import pipeline_traits
    from pytest_hotswap.pipelines.saved import identity_of
    from pytest_hotswap.plugin.fixtures import session_of

    source = identity_of(source)  # as a cell's pipeline names its source
    plain = (source, options.device, options.dtype, options.quantize)
    return pipeline_traits(_plain_spec(session_of(config), source, options, plain))


_EAGER_OUTPUTS: dict[int, dict[Any, Any]] = {}
#: Seconds this process spent building and running eager references (the time split).
EAGER_SECONDS = [0.0]
_EAGER_SPECS: dict[tuple[Any, ...], Any] = {}

#: The user property with the seconds a test spent on eager references (set at its teardown).
EAGER_PROPERTY = "hotswap_eager_s"


def take_eager_seconds() -> float:
    """The eager-reference seconds since the last call (one test's, called at its teardown)."""
    seconds, EAGER_SECONDS[0] = EAGER_SECONDS[0], 0.0
    return round(seconds, 3)


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
