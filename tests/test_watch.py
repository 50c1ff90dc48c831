"""CompileWatcher against real dynamo compiles (backend="eager": guards decide recompiles).

Every test compiles functions defined inside it, so no two tests share a code object or its
cache entries, and no test resets dynamo (other tests in this process keep their compiled models;
the reset case runs in a subprocess in test_plugin_marker.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import pytest
import torch

from pytest_hotswap.watch import CompileWatcher, RecompileError, relevant_first, shorten_reason


class _Scaled(torch.nn.Module):
    """A Linear times a Python float; subclass it inside each test so each has its own frame."""

    def __init__(self, out_features: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, out_features)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


X = torch.ones(2, 4)


def test_in_place_update_is_one_compile_and_no_recompile() -> None:
    class Model(_Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale

    model = Model()
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        compiled(X)
        watch.step("hotswap #1: same shape", swap_ms=1.5)
        with torch.no_grad():
            model.lin.weight.copy_(torch.randn(4, 4))
        out = compiled(X)
    assert torch.allclose(out, model(X))
    assert (watch.compiles, watch.recompiles, watch.graph_breaks) == (1, 0, 0)
    assert [event.kind for event in watch.events] == ["compile"]
    assert watch.events[0].frame == "forward" and watch.events[0].compile_id.endswith("/0")
    assert watch.steps[0].label == "hotswap #1: same shape" and watch.steps[0].swap_ms == 1.5
    assert watch.compile_seconds > 0
    assert not watch.had_storm and not watch.was_blind
    watch.assert_no_recompile()


def test_python_float_change_is_a_recompile_with_its_guard() -> None:
    class Model(_Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale

    model = Model()
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        compiled(X)
        watch.step("strength 0.5")
        model.scale = 0.5
        compiled(X)
    assert watch.recompiles == 1
    event = watch.events[-1]
    assert event.kind == "recompile" and event.step == "strength 0.5"
    assert event.compile_id.endswith("/1")
    assert "scale == 1.0" in event.reasons[0]
    with pytest.raises(RecompileError) as caught:
        watch.assert_no_recompile()
    message = str(caught.value)
    assert message.startswith("1 recompile (none allowed)")
    assert 'recompile after step "strength 0.5": forward (tests/test_watch.py:' in message
    assert "guard: self.scale == 1.0" in message


def test_shape_change_names_the_tensor_and_allowance_counts() -> None:
    class Model(_Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale

    model = Model()
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        compiled(X)
        watch.step("hotswap #2: rank 8")
        model.lin = torch.nn.Linear(4, 8)
        compiled(X)
    (event,) = [event for event in watch.events if event.is_recompile]
    assert "size mismatch at index 0. expected 4, actual 8" in event.reasons[0]
    assert "'self.lin.bias'" in shorten_reason(event.reasons[0])
    watch.assert_no_recompile(max_recompiles=1)
    with pytest.raises(RecompileError, match=r"1 recompile \(none allowed\)"):
        watch.assert_no_recompile()


def _shared_frame(forward):  # like diffusers' apply_lora_scale: one `wrapper` code object
    @functools.wraps(forward)
    def wrapper(self, x):
        return forward(self, x)

    return wrapper


def test_warmup_makes_a_new_model_on_a_shared_frame_a_first_compile() -> None:
    class Small(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, width)

        @_shared_frame
        def forward(self, x):
            return self.lin(x)

    first, second, third = Small(4), Small(6), Small(8)
    with CompileWatcher() as watch:
        torch.compile(first, backend="eager")(X)
        with watch.warmup("second model"):
            torch.compile(second, backend="eager")(X)
        watch.step("third model, no warmup")
        torch.compile(third, backend="eager")(X)  # negative control: same frame, no warmup
    assert [event.frame for event in watch.events] == ["wrapper"] * 3
    assert [event.kind for event in watch.events] == ["compile", "compile", "recompile"]
    assert (
        watch.events[1].compile_id.endswith("/1") and watch.events[1].step == "warmup: second model"
    )
    assert watch.events[2].step == "third model, no warmup"


def test_nested_watchers_see_their_own_scope_and_share_labels() -> None:
    class Model(_Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale

    model = Model()
    compiled = torch.compile(model, backend="eager")
    assert CompileWatcher.current() is None
    with CompileWatcher() as outer:
        compiled(X)
        with CompileWatcher() as inner:
            assert CompileWatcher.current() is inner
            CompileWatcher.current().step("library swap")
            model.scale = 2.0
            compiled(X)
            with inner:  # re-entrant
                assert CompileWatcher.current() is inner
        assert CompileWatcher.current() is outer
        model.lin = torch.nn.Linear(4, 8)  # a float changed once is dynamic: change a shape
        compiled(X)
    assert CompileWatcher.current() is None
    assert [event.kind for event in outer.events] == ["compile", "recompile", "recompile"]
    assert [event.kind for event in inner.events] == ["recompile"]
    assert inner.events[0].step == outer.events[1].step == "library swap"
    assert [step.label for step in outer.steps] == ["library swap"]


def test_recompile_storm_always_fails() -> None:
    def double(x):
        return x * 2

    compiled = torch.compile(double, backend="eager")
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32]
    with torch._dynamo.config.patch(recompile_limit=2), CompileWatcher() as watch:
        for dtype in dtypes:
            compiled(torch.ones(3, dtype=dtype))
    kinds = [event.kind for event in watch.events]
    assert kinds == ["compile", "recompile", "storm"]  # then it runs eagerly, silently
    assert watch.had_storm
    storm = watch.events[-1]
    assert storm.frame == "double" and storm.filename == __file__
    assert "recompile_limit = 2 reached" in storm.reasons[-1]
    assert "dtype mismatch" in storm.reasons[0]
    with pytest.raises(RecompileError, match="recompile storm"):
        watch.assert_no_recompile(max_recompiles=100)


def test_graph_breaks_are_counted() -> None:
    def breaks(x):
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2

    def clean(x):
        return (x + 1) * 2

    with CompileWatcher() as broken:
        torch.compile(breaks, backend="eager")(X)
    with CompileWatcher() as whole:
        torch.compile(clean, backend="eager")(X)
    assert broken.graph_breaks == 1 and broken.compiles == 2  # the resume function compiles too
    assert whole.graph_breaks == 0 and whole.compiles == 1
    assert broken.recompiles == 0


def test_cudagraph_rerecords_and_skips_are_recompiles() -> None:
    from torch._dynamo.callback import CallbackTrigger
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    handler = torch._dynamo.callback_handler

    def record(compile_id: str) -> None:
        with handler.install_callbacks(CallbackTrigger.CUDAGRAPH_RECORDING, compile_id):
            pass

    with CompileWatcher() as recorded_once:
        record("901/0")
    assert recorded_once.events == []  # the first recording is the expected one
    with CompileWatcher() as watch:
        watch.step("swap_tensors swap")
        record("901/0")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs")
    assert [event.kind for event in watch.events] == ["cudagraph_rerecord", "cudagraph_skip"]
    assert watch.recompiles == 2 and watch.events[0].step == "swap_tensors swap"
    assert "skipping cudagraphs due to mutated inputs" in watch.report()


def test_leaves_torch_as_it_found_it() -> None:
    loggers = [
        logging.getLogger(name)
        for name in (
            "torch._utils_internal",
            "torch._dynamo.convert_frame",
            "torch._inductor.cudagraph_utils.__cudagraphs",
        )
    ]
    before = [(log.level, list(log.filters), log.getEffectiveLevel()) for log in loggers]
    callbacks = list(torch._dynamo.callback_handler.start_callbacks)
    config = torch._dynamo.config.get_config_copy()
    stance = repr(torch._dynamo.eval_frame._stance)

    def add(x):
        return x + 1

    with torch._dynamo.config.patch(log_compilation_metrics=False):
        with CompileWatcher() as watch:
            torch.compile(add, backend="eager")(X)
        assert torch._dynamo.config.log_compilation_metrics is False
    assert watch.compiles == 1  # seen even with compilation-metrics logging turned off
    assert [(log.level, list(log.filters), log.getEffectiveLevel()) for log in loggers] == before
    assert torch._dynamo.callback_handler.start_callbacks == callbacks
    assert torch._dynamo.config.get_config_copy() == config
    assert repr(torch._dynamo.eval_frame._stance) == stance


def test_compile_metrics_stay_out_of_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    def sub(x):
        return x - 1

    with CompileWatcher() as watch:
        torch.compile(sub, backend="eager")(X)
    assert watch.compiles == 1
    assert not [r for r in caplog.records if r.name == "torch._utils_internal"]


@pytest.mark.parametrize(
    ("reason", "short"),
    [
        (
            "0/1: tensor 'self.__dict__['_modules']['mid_block']._modules['attentions']._modules['0']"
            "._modules['transformer_blocks']._modules['0']._modules['attn1']._modules['to_k']"
            "._modules['lora_A']._modules['default']._parameters['weight']' size mismatch at "
            "index 0. expected 128, actual 256",
            "tensor 'mid_block.attentions.0...to_k.lora_A.default.weight' size mismatch at "
            "index 0. expected 128, actual 256",
        ),
        (
            "0/0: self.__dict__['_modules']['transformer_blocks']._modules['0'].__dict__['_modules']"
            "['attn']._modules['to_q'].scaling['default'] == 1.0  # result = result + x  "
            "# peft/tuners/lora/layer.py:1102 in forward\nUser stack trace:\n  File ...",
            "self.transformer_blocks.0.attn.to_q.scaling['default'] == 1.0",
        ),
        ("0/0: len(kwargs) == 3", "len(kwargs) == 3"),
        ("1/2: L['self'].scale == 1.0", "self.scale == 1.0"),
    ],
)
def test_shorten_reason(reason: str, short: str) -> None:
    assert shorten_reason(reason) == short


def test_a_storm_under_fullgraph_is_one_event_per_compile_id():
    """With fullgraph dynamo raises and also records metrics for the refused compile: one event."""

    def double(x):
        return x * 2

    compiled = torch.compile(double, backend="eager", dynamic=False, fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=2), CompileWatcher() as watch:
        compiled(torch.ones(1))
        compiled(torch.ones(2))
        for n in (3, 4):
            with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
                compiled(torch.ones(n))
    ids = [event.compile_id for event in watch.events]
    assert len(ids) == len(set(ids)), [(e.compile_id, e.frame, e.kind) for e in watch.events]
    assert [e.kind for e in watch.events][-2:] == ["storm", "storm"]
    assert all(e.frame == "double" for e in watch.events)


def _metrics_off_by_config():
    return torch._dynamo.config.patch(log_compilation_metrics=False)


@contextlib.contextmanager
def _metrics_logger_disabled():
    logger = logging.getLogger("torch._utils_internal")
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = False


_BLINDERS = {"config": _metrics_off_by_config, "logger": _metrics_logger_disabled}


@pytest.mark.parametrize("blinder", list(_BLINDERS))
def test_compiles_hidden_inside_the_scope_fail_instead_of_passing(blinder: str) -> None:
    """Turning compile metrics off inside a watched scope would hide a recompile: it fails."""

    def config(x):  # one frame per case: a code object compiles once per process
        return x * 3

    def logger(x):
        return x * 3

    frame = {"config": config, "logger": logger}[blinder]
    compiled = torch.compile(frame, backend="eager", dynamic=False)
    with CompileWatcher() as watch:
        compiled(torch.ones(1))
        with _BLINDERS[blinder]():
            watch.step("metrics off")
            compiled(torch.ones(2))  # a shape guard fails: a recompile the log tap cannot see
    assert [(e.kind, e.frame, e.step) for e in watch.events] == [
        ("compile", blinder, None),
        ("unobserved", blinder, "metrics off"),
    ]
    assert watch.was_blind and watch.recompiles == 1
    with pytest.raises(RecompileError) as caught:
        watch.assert_no_recompile(max_recompiles=100)
    assert (
        "compile the watcher did not see (torch._dynamo.config.log_compilation_metrics was turned "
        "off, or the torch._utils_internal logger silenced, inside the watched scope; leave both "
        f'on so recompiles can be counted) after step "metrics off": {blinder} (tests/test_watch.py:'
    ) in str(caught.value)


def test_compile_metrics_left_off_fail_when_counts_are_read() -> None:
    """Left off at the end of the scope: every compile after it would go unseen, so the watcher
    says so when its counts are read, and once more for a compile it missed."""

    def quadruple(x):
        return x * 4

    compiled = torch.compile(quadruple, backend="eager")
    config = torch._dynamo.config
    try:
        with CompileWatcher() as watch:
            compiled(torch.ones(1))
            config.log_compilation_metrics = False
            assert watch.recompiles == 1  # the flag, before any compile was missed
            compiled(torch.ones(1, dtype=torch.float64))
        kinds = [(e.kind, e.frame) for e in watch.events]
    finally:
        config.log_compilation_metrics = True
    assert kinds == [
        ("compile", "quadruple"),
        ("unobserved", "torch._dynamo.config.log_compilation_metrics"),
        ("unobserved", "quadruple"),
    ]
    with pytest.raises(RecompileError, match="log_compilation_metrics is False"):
        watch.assert_no_recompile()


def test_reasons_of_other_models_sharing_the_frame_come_last():
    """Every diffusers model compiles one frame: the called model's own guard must come first."""
    reasons = [
        "0/0: len(args) == 2  # result = forward_fn(self, *args, **kwargs)",
        "0/1: ___check_type_id(self, 94778725611840), type=<class 'FluxTransformer2DModel'>",
        "0/2: not args  # attention_kwargs = kwargs.get(kwargs_name)",
        "0/3: tensor 'self.conv_in.lora_A.default.weight' size mismatch at index 0",
        "0/4: not kwargs['cross_attention_kwargs']",
    ]
    assert relevant_first(reasons) == (reasons[3], reasons[4], reasons[0], reasons[1], reasons[2])
    assert relevant_first(reasons[3:]) == tuple(reasons[3:])  # otherwise the order is kept


# --- Verdicts that do not depend on what ran before (issue 11) ---------------------------------


class _Net(torch.nn.Module):
    """One class for the tests below: every instance shares ``forward``'s code object."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _shape_change_test(model_class: type[torch.nn.Module], isolate: bool) -> CompileWatcher:
    """What a marked test does: compile its own model, call it, swap a shape in, call again."""
    net = model_class()
    compiled = torch.compile(net, backend="eager", fullgraph=True, isolate_recompiles=isolate)
    with CompileWatcher() as watch:
        compiled(X)
        watch.step("swap to width 6")
        net.lin = torch.nn.Linear(4, 6)
        compiled(X)
    return watch


def _earlier_test(model_class: type[torch.nn.Module], isolate: bool) -> None:
    """An earlier test in the same process: compiles widths 4 and 6 on the same code object."""
    earlier = model_class()
    compiled = torch.compile(earlier, backend="eager", fullgraph=True, isolate_recompiles=isolate)
    compiled(X)
    earlier.lin = torch.nn.Linear(4, 6)
    compiled(X)


def test_isolated_compiles_see_the_recompile_a_fresh_process_sees() -> None:
    class Net(_Net):
        def forward(self, x):
            return self.lin(x) - 0

    _earlier_test(Net, isolate=True)
    isolated = _shape_change_test(Net, isolate=True)  # as in a fresh process
    assert [event.kind for event in isolated.events] == ["compile", "recompile"]
    assert "size mismatch at index 0. expected 4, actual 6" in isolated.events[1].reasons[0]


def test_without_isolation_an_earlier_models_entries_are_caught_as_a_cache_switch() -> None:
    class Net(_Net):
        def forward(self, x):
            return self.lin(x) - 1

    _earlier_test(Net, isolate=False)
    # No compile at all: the earlier model's entries match. The check of dynamo's cache lists
    # still sees the frame move, after the step, to an entry it had not run.
    shared = _shape_change_test(Net, isolate=False)
    assert shared.compiles == 0
    assert [event.kind for event in shared.events] == ["cache_switch"]


def test_a_cache_switch_after_a_step_fails_with_the_guard_that_tells_the_entries_apart() -> None:
    class Shared(_Net):
        def forward(self, x):
            return self.lin(x)

    model = Shared()
    compiled = torch.compile(model, backend="eager", fullgraph=True, isolate_recompiles=True)
    compiled(X)  # an earlier test compiled width 4 and width 6 on this very object
    model.lin = torch.nn.Linear(4, 6)
    compiled(X)

    model.lin = torch.nn.Linear(4, 4)
    with CompileWatcher() as watch:
        compiled(X)  # runs the width-4 entry: a first use, fine
        watch.step("hotswap #1: width 6")
        model.lin = torch.nn.Linear(4, 6)
        compiled(X)  # runs the width-6 entry an earlier test compiled: a fresh process recompiles
    assert watch.compiles == 0
    [switch] = watch.events
    assert (switch.kind, switch.frame, switch.step) == (
        "cache_switch",
        "forward",
        "hotswap #1: width 6",
    )
    assert switch.reasons[0].startswith(
        "tensor 'L['self']._modules['lin']._parameters['bias']' size=[4] (entry "
    )
    assert switch.reasons[0].endswith(
        "is size=[6] in entry " + switch.compile_id + ", compiled before this test"
    )
    assert watch.recompiles == 1
    with pytest.raises(RecompileError) as caught:
        watch.assert_no_recompile()
    message = str(caught.value)
    assert "cache switch (the frame ran a compiled entry made before this test" in message
    assert 'after step "hotswap #1: width 6": forward (tests/test_watch.py:' in message
    assert "guard: tensor 'self.lin.bias' size=[4] (entry" in message

    # Negative controls on the same object: entries this scope ran before a step are fine.
    with CompileWatcher() as again:
        compiled(X)  # width 6
        model.lin = torch.nn.Linear(4, 4)
        compiled(X)  # width 4: a second entry, but before any step
        again.step("back and forth")
        model.lin = torch.nn.Linear(4, 6)
        compiled(X)
        model.lin = torch.nn.Linear(4, 4)
        compiled(X)
    assert again.events == [] and again.recompiles == 0


def test_in_place_swaps_on_a_shared_compiled_object_are_no_cache_switch() -> None:
    class Shared(_Net):
        def forward(self, x):
            return self.lin(x) + 0

    model = Shared()
    compiled = torch.compile(model, backend="eager", fullgraph=True, isolate_recompiles=True)
    compiled(X)
    with CompileWatcher() as watch:
        compiled(X)
        watch.step("hotswap #1: in place")
        with torch.no_grad():
            model.lin.weight.copy_(torch.randn(4, 4))
        compiled(X)
    assert watch.events == []
    watch.assert_no_recompile()


def test_adopted_entries_count_as_the_scopes_own_setup() -> None:
    class Shared(_Net):
        def forward(self, x):
            return self.lin(x) * 1

    model = Shared()
    model.compile(backend="eager", fullgraph=True, isolate_recompiles=True)
    model(X)  # width 4 and width 6, both compiled while a pipeline was built
    model.lin = torch.nn.Linear(4, 6)
    model(X)
    with CompileWatcher() as watch:
        watch.adopt(model)
        watch.step("a swap")
        model.lin = torch.nn.Linear(4, 4)
        model(X)
    assert watch.events == []


def test_a_storm_is_seen_in_the_compile_metrics_when_dynamos_logger_is_quiet() -> None:
    def triple(x):
        return x * 3

    compiled = torch.compile(triple, backend="eager", isolate_recompiles=True, recompile_limit=2)
    dynamo = logging.getLogger("torch._dynamo")
    level = dynamo.level
    try:
        with CompileWatcher() as watch:
            dynamo.setLevel(logging.ERROR)  # a downstream fixture quieting dynamo
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                compiled(torch.ones(3, dtype=dtype))
    finally:
        dynamo.setLevel(level)
    assert [event.kind for event in watch.events] == ["compile", "recompile", "storm"]
    assert watch.events[-1].reasons[-1] == "dynamo: Dynamo recompile limit exceeded"
    with pytest.raises(RecompileError, match="recompile storm"):
        watch.assert_no_recompile(max_recompiles=100)


def test_a_storm_is_seen_in_the_compile_metrics_when_set_logs_quiets_dynamo() -> None:
    """The other way a suite quiets dynamo: ``torch._logging.set_logs``, which also sets the
    level of the ``torch._dynamo`` loggers the watcher's log sources read."""

    def quadruple(x):
        return x * 4

    compiled = torch.compile(quadruple, backend="eager", isolate_recompiles=True, recompile_limit=2)
    try:
        with CompileWatcher() as watch:
            torch._logging.set_logs(dynamo=logging.ERROR)
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                compiled(torch.ones(3, dtype=dtype))
    finally:
        torch._logging.set_logs()
    assert [event.kind for event in watch.events] == ["compile", "recompile", "storm"]
    assert watch.events[-1].reasons[-1] == "dynamo: Dynamo recompile limit exceeded"
    assert watch.events[-1].frame == "quadruple"  # from the frame's earlier records
    with pytest.raises(RecompileError, match="recompile storm"):
        watch.assert_no_recompile(max_recompiles=100)


def test_isolate_compiles_makes_isolation_the_default_and_puts_torch_back() -> None:
    from pytest_hotswap.watch.caches import region_of
    from pytest_hotswap.watch.isolation import isolate_compiles

    original = torch.compile
    undo = isolate_compiles()
    try:
        assert region_of(torch.compile(_Net(), backend="eager")) is not None
        explicit = torch.compile(_Net(), backend="eager", isolate_recompiles=False)
        assert region_of(explicit) is None  # an explicit argument wins
        assert isolate_compiles()() is None  # patching twice is a no-op
    finally:
        undo()
    assert torch.compile is original


def test_a_refused_call_runs_again_eagerly_and_counts_once() -> None:
    """fail_at_guard(run_eagerly=True): the recompile is refused at its guard (nothing compiled),
    the call runs again eagerly with the new value, and the same refusal on the next call is the
    same recompile (a fresh process would have compiled one entry serving both calls)."""
    from torch._dynamo.utils import counters

    from pytest_hotswap.watch.watcher import call_or_run_eagerly

    class Model(_Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale

    model = Model()
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        compiled(X)
        graphs = counters["stats"]["unique_graphs"]
        with watch.fail_at_guard(0, run_eagerly=True):
            watch.step("strength 0.5")
            model.scale = 0.5
            first = call_or_run_eagerly(lambda: compiled(X))
            second = call_or_run_eagerly(lambda: compiled(X))
        assert counters["stats"]["unique_graphs"] == graphs  # no graph compiled
    torch.testing.assert_close(first, model.lin(X) * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert watch.recompiles == 1
    (event,) = [e for e in watch.events if e.is_recompile]
    assert event.stopped_at_guard and "scale == 1.0" in event.reasons[0]
    assert event.step == "strength 0.5"


def test_a_refused_call_fails_without_run_eagerly() -> None:
    """The negative control: plain fail_at_guard lets dynamo's refusal end the call, and outside
    any watcher call_or_run_eagerly only calls."""
    from pytest_hotswap.watch.watcher import call_or_run_eagerly

    class Model(_Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale

    model = Model()
    compiled = torch.compile(model, backend="eager")
    with CompileWatcher() as watch:
        compiled(X)
        with watch.fail_at_guard(0):
            model.scale = 0.5
            with pytest.raises(torch._dynamo.exc.RecompileError, match=r"scale == 1\.0"):
                call_or_run_eagerly(lambda: compiled(X))
    assert watch.recompiles == 1 and watch.stopped_at_guard
    model.scale = 2.0  # outside: dynamo compiles as usual
    torch.testing.assert_close(call_or_run_eagerly(lambda: compiled(X)), model.lin(X) * 2.0)


def test_asked_to_run_eagerly_from_inside_the_call_it_holds_until_fail_at_guard_ends() -> None:
    """run_eagerly_past_allowance from inside the test's call (test_catalog learns its defect
    there): the active watcher runs refused calls again eagerly for the rest of fail_at_guard."""
    from pytest_hotswap.plugin.session import ITEM_KEY, WatchedTest, run_eagerly_past_allowance

    item = type("Item", (), {"stash": pytest.Stash()})()
    with CompileWatcher() as watch:
        item.stash[ITEM_KEY] = WatchedTest(0, watcher=watch)
        with watch.fail_at_guard(0):
            assert not watch.eager_after_refusal  # the negative control
            run_eagerly_past_allowance(item)
            assert watch.eager_after_refusal
        assert not watch.eager_after_refusal
    assert item.stash[ITEM_KEY].run_eagerly
