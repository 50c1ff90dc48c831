"""Hotswap scenarios, each run on every pipeline x implementation of the session.

A scenario that swaps in a valid adapter passes when the compiled pipeline does not recompile and
its output equals a fresh eager pipeline with the same adapter loaded the plain way. A scenario
that swaps in an adapter that cannot be hotswapped passes when the swap raises, the model is left
bit-for-bit as it was, and the next call neither recompiles nor changes the output. What an
implementation cannot do at all is "not supported"; its known upstream defects are xfails (strict
on the stack they were verified on).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from pytest_hotswap.conformance.support import (
    DEFECT_SCENARIOS,
    VERDICT_PROPERTY,
    ModelChangedError,
    NotRejectedError,
    Snapshot,
    assert_same_output,
    defect_overrides,
    eager_output,
    expect_defect,
    plain_traits,
    snapshot,
)

pytestmark = pytest.mark.no_recompile


@pytest.fixture(autouse=True)
def _known_defects(request: pytest.FixtureRequest) -> None:
    if "hotswap_pipeline" not in request.fixturenames:
        return
    from pytest_hotswap.plugin.fixtures import session_of

    implementation = request.node.callspec.params["hotswap_pipeline"][1]
    scenario = request.node.originalname.removeprefix("test_")
    impl = session_of(request.config).implementations[implementation]
    scenario = DEFECT_SCENARIOS.get(scenario, scenario)
    traits: frozenset[str] = frozenset()
    if any(d.only_with for d in impl.known_defects if d.scenario == scenario):
        # a defect only some pipelines show: what this one's components are
        source = request.node.callspec.params["hotswap_pipeline"][0]
        traits = plain_traits(request.config, source, request.getfixturevalue("hotswap_options"))
    defect = impl.defect(scenario, traits)
    if defect is not None:
        expect_defect(request, defect)


def swap_and_compare(pipeline: Any, lora: Any, config: pytest.Config) -> Any:
    """Swap ``lora`` in, run, and compare with a fresh eager load; returns the output."""
    __tracebackhide__ = True
    before = pipeline.run()
    pipeline.swap(lora)
    actual = pipeline.run()
    assert_same_output(actual, eager_output(config, pipeline, lora), pipeline.options.dtype)
    assert not _close(actual, before), (
        "the new adapter did not change the output: nothing was swapped"
    )
    return actual


def assert_rejected(
    pipeline: Any,
    lora: Any,
    expected_error: tuple[type[Exception], ...],
    compiled_again: Callable[[], Any] | None = None,
) -> None:
    """The swap raises ``expected_error``; the model is untouched and keeps working as before.

    A pipeline built uncompiled (a known defect decided in the swap) that passes all that is
    checked again on ``compiled_again()``, its compiled twin: a fixed defect passes only where
    the next compiled call does not recompile either."""
    import torch

    __tracebackhide__ = True
    before_output = pipeline.run()
    before: Snapshot = snapshot(pipeline)
    try:
        pipeline.swap(lora)
    except expected_error:
        pass
    else:
        raise NotRejectedError(f"{pipeline.implementation} accepted {lora}")
    changed = before.differences(snapshot(pipeline))
    if changed:
        raise ModelChangedError(
            "the failed swap changed the model:\n  " + "\n  ".join(changed[:10])
        )
    assert torch.equal(pipeline.run(), before_output), "the output changed after a failed swap"
    if compiled_again is not None and not pipeline.compiled:
        assert_rejected(compiled_again(), lora, expected_error)


def _close(a: Any, b: Any) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _factory(factory: Any, pipeline: Any, **kwargs: Any) -> Any:
    """Another configuration of the same pipeline and implementation; "not supported" when the
    implementation cannot prepare it."""
    from pytest_hotswap.implementations import UnsupportedFeatureError

    try:
        return factory(pipeline.source or pipeline.name, pipeline.implementation, **kwargs)
    except UnsupportedFeatureError as error:
        pytest.skip(f"not supported: {error}")


# --- Accepted adapters -----------------------------------------------------------------------


def test_same_rank(hotswap_pipeline, lora_factory, pytestconfig):
    swap_and_compare(hotswap_pipeline, lora_factory(hotswap_pipeline, rank=8, seed=1), pytestconfig)


def test_lower_rank(hotswap_pipeline, lora_factory, pytestconfig):
    swap_and_compare(hotswap_pipeline, lora_factory(hotswap_pipeline, rank=4, seed=2), pytestconfig)


def test_rank_equals_max(hotswap_pipeline, lora_factory, pytestconfig):
    lora = lora_factory(hotswap_pipeline, rank=hotswap_pipeline.max_rank, seed=3)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_different_alpha(hotswap_pipeline, lora_factory, pytestconfig):
    lora = lora_factory(hotswap_pipeline, rank=8, alpha=32, seed=4)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_subset_targets(hotswap_pipeline, lora_factory, pytestconfig):
    lora = lora_factory(hotswap_pipeline, rank=8, targets="half", seed=5)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_per_layer_ranks(hotswap_pipeline, lora_factory, pytestconfig):
    from pytest_hotswap.adapters import lora_targets

    pattern = dict.fromkeys(lora_targets(hotswap_pipeline.denoiser)[:3], hotswap_pipeline.max_rank)
    lora = lora_factory(hotswap_pipeline, rank=4, alpha=8, seed=9, rank_pattern=pattern)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_disjoint_targets(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, pytestconfig):
    from pytest_hotswap.adapters import lora_targets

    names = lora_targets(hotswap_pipeline.denoiser)
    even, odd = names[0::2], names[1::2]
    first = lora_factory(hotswap_pipeline, rank=8, targets=even, seed=30)
    second = lora_factory(hotswap_pipeline, rank=8, targets=odd, seed=31)
    pipeline = _factory(
        hotswap_pipeline_factory, hotswap_pipeline, first_lora=first, targets=[first, second]
    )
    swap_and_compare(pipeline, second, pytestconfig)
    pipeline.swap(first)
    assert_same_output(
        pipeline.run(), eager_output(pytestconfig, pipeline, first), pipeline.options.dtype
    )


def test_conv2d(hotswap_pipeline, lora_factory, pytestconfig):
    import torch

    from pytest_hotswap.adapters import lora_targets
    from pytest_hotswap.reference.components import unwrap_compiled

    denoiser = unwrap_compiled(hotswap_pipeline.denoiser)
    convs = [
        name
        for name in lora_targets(denoiser)
        if isinstance(denoiser.get_submodule(name).get_base_layer(), torch.nn.Conv2d)
    ]
    if not convs:
        pytest.skip(f"n/a: {hotswap_pipeline.name}'s denoiser has no Conv2d layers")
    lora = lora_factory(hotswap_pipeline, rank=16, targets=convs, seed=6)
    swap_and_compare(hotswap_pipeline, lora, pytestconfig)


def test_quantized_base(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, pytestconfig):
    import importlib.util

    quantize = hotswap_pipeline.options.quantize
    if quantize == "none":  # not asked for: torchao is an optional extra (asked: a usage error)
        try:
            found = importlib.util.find_spec("torchao") is not None
        except ValueError:  # sys.modules["torchao"] = None
            found = False
        if not found:
            pytest.skip(
                "not supported: the quantized base needs torchao: "
                "pip install 'pytest-hotswap[quant]'"
            )
        quantize = "int8-weight-only"
    pipeline = hotswap_pipeline_factory(
        hotswap_pipeline.source or hotswap_pipeline.name,
        hotswap_pipeline.implementation,
        quantize=quantize,
    )
    swap_and_compare(pipeline, lora_factory(pipeline, rank=16, seed=7), pytestconfig)


def test_a_b_a(hotswap_pipeline, lora_factory):
    import torch

    first = hotswap_pipeline.run()
    hotswap_pipeline.swap(lora_factory(hotswap_pipeline, rank=16, alpha=8, seed=8))
    other = hotswap_pipeline.run()
    hotswap_pipeline.swap(hotswap_pipeline.first_lora)
    again = hotswap_pipeline.run()
    assert not _close(other, first), "adapter B did not change the output"
    assert torch.equal(again, first), "A -> B -> A did not give A's output back bit for bit"


def test_long_sequence(hotswap_pipeline, lora_factory, pytestconfig):
    import torch

    max_rank = hotswap_pipeline.max_rank
    loras = [
        lora_factory(hotswap_pipeline, rank=rank, alpha=alpha, targets=targets, seed=10 + i)
        for i, (rank, alpha, targets) in enumerate(
            [
                (4, None, "all"),
                (max_rank, 16, "all"),
                (16, 4, "half"),
                (min(32, max_rank), None, "all"),
            ]
        )
    ]
    first_outputs: dict[Any, Any] = {}
    for number, lora in zip(range(50), itertools.cycle(loras)):
        hotswap_pipeline.swap(lora)
        output = hotswap_pipeline.run()
        if lora not in first_outputs:
            expected = eager_output(pytestconfig, hotswap_pipeline, lora)
            assert_same_output(output, expected, hotswap_pipeline.options.dtype)
            first_outputs[lora] = output
        else:
            assert torch.equal(output, first_outputs[lora]), f"swap #{number + 1} drifted"


def test_strength_change(hotswap_pipeline, pytestconfig):
    first = hotswap_pipeline.first_lora
    for scale in (0.5, 0.7, 1.0):
        hotswap_pipeline.set_strength(scale)
        actual = hotswap_pipeline.run()
        expected = eager_output(pytestconfig, hotswap_pipeline, first, scale=scale)
        assert_same_output(actual, expected, hotswap_pipeline.options.dtype)


# --- Beyond the pattern: text encoders and weighted slots ---------------------------------------


def test_text_encoder_hotswap(
    hotswap_pipeline, hotswap_pipeline_factory, lora_factory, pytestconfig
):
    _skip_without_text_encoder(hotswap_pipeline)
    pipeline = _factory(hotswap_pipeline_factory, hotswap_pipeline, text_encoder=True)
    for seed in (40, 41):
        lora = lora_factory(pipeline, rank=4, alpha=8, text_encoder=True, seed=seed)
        swap_and_compare(pipeline, lora, pytestconfig)


def _skip_without_text_encoder(pipeline: Any) -> None:
    """n/a where the pipeline's LoRA loader loads no text encoder (what it declares, named)."""
    if pipeline.spec.text_encoders():
        return
    loader = _declared_loader(pipeline.spec.pipe)
    if loader is None:
        pytest.skip(f"n/a: {pipeline.name} has no text encoder")
    loads = ", ".join(loader._lora_loadable_modules)
    pytest.skip(f"n/a: {loader.__name__} loads LoRA into {loads}: no text encoder")


def _declared_loader(pipe: Any) -> Any:
    """The pipeline's LoRA loader mixin, or None (a bare model, a pipeline without one)."""
    from pytest_hotswap.pipelines.families_driver import UnsupportedPipelineError, lora_loader

    if pipe is None:
        return None
    try:
        return lora_loader(pipe)
    except UnsupportedPipelineError:
        return None


def test_two_adapters(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, pytestconfig):
    pipeline = _factory(hotswap_pipeline_factory, hotswap_pipeline, slots=2)
    second = lora_factory(pipeline, rank=4, alpha=8, seed=42)
    pipeline.swap(second, slot=1)
    for weights in ((0.7, 0.4), (0.3, 1.0)):
        pipeline.set_strength(weights[0], slot=0)
        pipeline.set_strength(weights[1], slot=1)
        expected = eager_output(
            pytestconfig, pipeline, [(pipeline.first_lora, weights[0]), (second, weights[1])]
        )
        assert_same_output(pipeline.run(), expected, pipeline.options.dtype)


def test_slot_off_on(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, pytestconfig):
    import torch

    pipeline = _factory(hotswap_pipeline_factory, hotswap_pipeline, slots=2)
    alone = pipeline.run()  # every slot but the first starts switched off
    second = lora_factory(pipeline, rank=8, seed=43)
    pipeline.swap(second, slot=1)
    pipeline.set_strength(1.0, slot=1)
    both = pipeline.run()
    expected = eager_output(pytestconfig, pipeline, [(pipeline.first_lora, 1.0), (second, 1.0)])
    assert_same_output(both, expected, pipeline.options.dtype)
    pipeline.set_strength(0.0, slot=1)
    off = pipeline.run()
    _fail_if_recompiled()
    assert torch.equal(off, alone), "a slot switched off still changes the output"
    pipeline.set_strength(1.0, slot=1)
    on = pipeline.run()
    _fail_if_recompiled()
    assert torch.equal(on, both), "switching the slot back on did not restore its output"


def _fail_if_recompiled() -> None:
    """Fail now, as ``no_recompile`` would at the test's end, when something recompiled: a
    recompiled graph may round differently, and the exact checks after it would fail for that."""
    from pytest_hotswap.watch import CompileWatcher, RecompileError

    __tracebackhide__ = True
    watcher = CompileWatcher.current()
    if watcher is None:
        return
    try:
        watcher.assert_no_recompile()
    except RecompileError as error:
        pytest.fail(f"no_recompile: {error}", pytrace=False)


# --- Rejected adapters -----------------------------------------------------------------------


def test_rank_over_max(hotswap_pipeline, lora_factory):
    lora = lora_factory(hotswap_pipeline, rank=hotswap_pipeline.max_rank + 8, seed=20)
    assert_rejected(hotswap_pipeline, lora, hotswap_pipeline.impl.rejection("RankTooLargeError"))


def test_superset_targets(hotswap_pipeline, hotswap_pipeline_factory, lora_factory, request):
    def build(**overrides: Any) -> Any:
        return hotswap_pipeline_factory(
            hotswap_pipeline.source or hotswap_pipeline.name,
            hotswap_pipeline.implementation,
            first_targets="half",
            **overrides,
        )

    overrides = defect_overrides(request)
    pipeline = build(**overrides)
    error = pipeline.impl.rejection("UnexpectedTargetsError")
    lora = lora_factory(pipeline, rank=8, targets="all", seed=21)
    assert_rejected(pipeline, lora, error, lambda: build(**{**overrides, "compiled": True}))


def test_text_encoder_keys(hotswap_pipeline, lora_factory):
    _skip_without_text_encoder(hotswap_pipeline)
    lora = lora_factory(hotswap_pipeline, rank=8, text_encoder=True, seed=22)
    assert_rejected(hotswap_pipeline, lora, hotswap_pipeline.impl.rejection("TextEncoderLoraError"))


# --- Your adapters: the catalog ---------------------------------------------------------------


def _scaled_per_layer(header: Any) -> bool:
    """Whether the file's layers have different scalings (alpha / rank): a per-layer rank or
    alpha, which a hotswap through PEFT's pattern lookup gets wrong. A layer without an alpha in
    the file has alpha = rank, as diffusers loads it."""
    alphas = header.alphas
    return len({alphas.get(key, rank) / rank for key, rank in header.ranks.items()}) > 1


def test_catalog(catalog_case, hotswap_pipeline_factory, pytestconfig, request):
    """One file of the catalog, hotswapped into the catalog's pipeline and back to the first.

    The pipeline is padded to the catalog's max rank and, for the reference, onto the union of
    every usable file's targets. A file the pattern cannot take is refused, the model untouched.
    """
    import torch

    from pytest_hotswap.implementations import UnsupportedFeatureError
    from pytest_hotswap.plugin.fixtures import session_of

    entry, first, usable = catalog_case.entry, catalog_case.first, catalog_case.usable
    impl = session_of(pytestconfig).implementations[catalog_case.implementation]
    problem = catalog_case.problem(impl)
    defect = None
    if problem is not None:
        scenario, reason, error = problem
        if scenario == "peft_native_keys" and not impl.refuses_peft_native_keys:
            pytest.skip(f"not supported: {reason}: diffusers' loaders cannot read them")
        defect = impl.defect(scenario) if scenario else None
    elif _scaled_per_layer(entry.header):
        defect = impl.defect("rank_pattern")
    overrides = expect_defect(request, defect) if defect is not None else {}

    def build(**overrides: Any) -> Any:
        return hotswap_pipeline_factory(
            catalog_case.pipeline,
            catalog_case.implementation,
            first_lora=first.path,
            targets=[e.path for e in usable]
            if "union of targets" in catalog_case.features
            else None,
            max_rank=catalog_case.max_rank,
            **overrides,
        )

    try:
        pipeline = build(**overrides)
    except UnsupportedFeatureError as error:  # the reference on Wan 2.2's two denoisers
        pytest.skip(f"not supported: {error}")
    if problem is not None:
        request.node.user_properties.append((VERDICT_PROPERTY, f"refused: {reason}"))
        again = lambda: build(**{**overrides, "compiled": True})  # noqa: E731
        assert_rejected(pipeline, entry.path, pipeline.impl.rejection(error), again)
        return
    start = pipeline.run()
    if entry is not first:
        swap_and_compare(pipeline, entry.path, pytestconfig)
        pipeline.swap(first.path)
    assert torch.equal(pipeline.run(), start), "back to the first adapter, the output differs"
    assert_same_output(
        start, eager_output(pytestconfig, pipeline, first.path), pipeline.options.dtype
    )
