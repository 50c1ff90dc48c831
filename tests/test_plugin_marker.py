"""The ``no_recompile`` marker end to end: generated test files run by pytester.

One subprocess runs a batch of small files (real dynamo compiles with backend="eager", a reset, a
storm and a tiny diffusers UNet), so torch's global state never leaks into this process (the
shared diffusers frame counts every model of a process towards one recompile_limit).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

# Its module fixtures are built once, on one worker.
pytestmark = pytest.mark.xdist_group("plugin_marker")

CONFTEST = """
import json
import subprocess
import sys
import textwrap
import time
import logging

import torch

LOGGERS = ("torch._utils_internal", "torch._dynamo.convert_frame",
           "torch._inductor.cudagraph_utils.__cudagraphs")


def torch_state():
    return {
        "config": repr(sorted(torch._dynamo.config.get_config_copy().items())),
        "stance": repr(torch._dynamo.eval_frame._stance),
        "loggers": [(logging.getLogger(n).level, len(logging.getLogger(n).filters)) for n in LOGGERS],
    }


BEFORE = torch_state()
EVENTS = []


def pytest_hotswap_recompile(item, event):
    EVENTS.append({"test": item.name, "kind": event.kind, "frame": event.frame,
                   "step": event.step, "reason": event.reasons[0] if event.reasons else ""})


def pytest_sessionfinish(session):
    with open("hook_events.json", "w") as handle:
        json.dump(EVENTS, handle)


class Scaled(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.lin = torch.nn.Linear(4, width)
        self.scale = 1.0
"""

TEST_MARKED = """
import pytest
import torch

from conftest import Scaled
from pytest_hotswap import CompileWatcher

X = torch.ones(2, 4)


@pytest.mark.no_recompile
def test_clean_in_place_update(compile_watcher):
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    compile_watcher.step("hotswap #1: in place", swap_ms=0.5)
    with torch.no_grad():
        model.lin.weight.copy_(torch.randn(4, 4))
    compiled(X)
    assert compile_watcher.compiles == 1


@pytest.mark.no_recompile
def test_shape_change():
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    CompileWatcher.current().step("hotswap #2: style_b (rank 8)")
    model.lin = torch.nn.Linear(4, 8)
    compiled(X)


@pytest.mark.no_recompile()
def test_float_scaling_change():
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    CompileWatcher.current().step("strength 0.5")
    model.scale = 0.5
    compiled(X)


@pytest.mark.no_recompile
def test_first_compiles_do_not_count():
    def one(x):
        return x + 1
    def two(x):
        return x * 2
    torch.compile(one, backend="eager")(X)
    torch.compile(two, backend="eager")(X)


@pytest.mark.no_recompile(max_recompiles=1)
def test_one_allowed_one_happens():
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    model.scale = 0.5
    compiled(X)


@pytest.mark.no_recompile(max_recompiles=1)
def test_one_allowed_two_happen():
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    model.scale = 0.5
    compiled(X)
    model.lin = torch.nn.Linear(4, 8)
    compiled(X)


def test_unwatched_recompile_passes():
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    model.scale = 0.5
    compiled(X)


@pytest.mark.no_recompile(max_recompiles=100)
def test_storm_fails_whatever_the_allowance():
    def double(x):
        return x * 2
    compiled = torch.compile(double, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        for dtype in (torch.float32, torch.float64, torch.float16):
            compiled(torch.ones(3, dtype=dtype))


@pytest.mark.no_recompile(count_all=True)  # compile on: the recompile is let through to the limit
def test_storm_under_fullgraph_fails_cleanly():
    def halve(x):
        return x / 2
    compiled = torch.compile(halve, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=1):
        for dtype in (torch.float32, torch.float64):
            compiled(torch.ones(3, dtype=dtype))


@pytest.fixture
def recompiles_in_setup():
    def triple(x, k):
        return x * k
    compiled = torch.compile(triple, backend="eager")
    compiled(X, 3.0)
    compiled(X, 4.0)


@pytest.mark.no_recompile
def test_setup_recompile_counts(recompiles_in_setup):
    pass


def test_other_failure_shows_recompiles(compile_watcher):
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    compile_watcher.step("before the bug")
    model.scale = 0.25
    compiled(X)
    assert False, "unrelated bug"


def test_reset_inside_scope(compile_watcher):
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(X)
    torch.compiler.reset()
    compiled(X)
    model.scale = 0.5
    compiled(X)
    assert [e.kind for e in compile_watcher.events] == ["compile", "compile", "recompile"]
    assert "scale == 1.0" in compile_watcher.events[-1].reasons[0]


@pytest.mark.no_recompile
class TestClassMark:
    def test_clean(self):
        def add(x):
            return x + 3
        compiled = torch.compile(add, backend="eager")
        compiled(X)
        compiled(X)

    def test_recompiles(self):
        class M(Scaled):
            def forward(self, x):
                return self.lin(x) * self.scale
        model = M()
        compiled = torch.compile(model, backend="eager")
        compiled(X)
        model.scale = 2.0
        compiled(X)
"""

TEST_MODULE_MARK = """
import pytest
import torch

from conftest import Scaled

pytestmark = [pytest.mark.no_recompile, pytest.mark.hotswap(pipeline="sd")]


def test_module_marked_recompile():
    class M(Scaled):
        def forward(self, x):
            return self.lin(x) * self.scale
    model = M()
    compiled = torch.compile(model, backend="eager")
    compiled(torch.ones(2, 4))
    model.scale = 0.5
    compiled(torch.ones(2, 4))
"""

TEST_DIFFUSERS = """
import pytest
import torch
from peft import LoraConfig

from pytest_hotswap import CompileWatcher
from pytest_hotswap.pipelines import build_tiny_unet, unet_inputs


@pytest.mark.no_recompile
def test_unet_lora_rank_change():
    unet = build_tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k"]))
    compiled = torch.compile(unet, backend="eager")
    inputs = unet_inputs()
    with torch.no_grad():
        compiled(**inputs)
        CompileWatcher.current().step("hotswap #2: style_b (rank 8)")
        unet.delete_adapters("default")
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_k"]))
        compiled(**inputs)
"""

TEST_QUIET = """
import logging

import pytest
import torch

X = torch.ones(3)


@pytest.fixture(params=["setLevel", "set_logs"])
def quiet_dynamo(request):
    # what a downstream suite does to quiet dynamo, undone afterwards
    dynamo = logging.getLogger("torch._dynamo")
    level = dynamo.level
    if request.param == "setLevel":
        dynamo.setLevel(logging.ERROR)
    else:
        torch._logging.set_logs(dynamo=logging.ERROR)
    yield
    if request.param == "setLevel":
        dynamo.setLevel(level)
    else:
        torch._logging.set_logs()


MODE = "m"


def _calls(count):
    global MODE

    def scaled(x):
        return x * len(MODE)

    compiled = torch.compile(scaled, backend="eager")
    for length in range(1, count + 1):  # each length a recompile (a guard on the global)
        MODE = "m" * length
        compiled(X)


@pytest.mark.no_recompile(max_recompiles=100)
def test_quiet_storm(quiet_dynamo):
    _calls(torch._dynamo.config.recompile_limit + 2)  # past recompile_limit: a storm


@pytest.mark.no_recompile(max_recompiles=100)
def test_quiet_no_storm(quiet_dynamo):
    _calls(3)  # two recompiles, allowed
"""

TEST_ZZ_STATE = """
from conftest import BEFORE, torch_state


def test_torch_state_unchanged_after_watched_tests():
    assert torch_state() == BEFORE
"""


@pytest.fixture(scope="module")
def batch(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pytest.RunResult, list[dict[str, str]]]:
    """One pytest subprocess over all generated files; its result and the hook's events."""
    root = tmp_path_factory.mktemp("marker_batch")
    files = {
        "conftest.py": CONFTEST,
        "test_marked.py": TEST_MARKED,
        "test_module_mark.py": TEST_MODULE_MARK,
        "test_diffusers.py": TEST_DIFFUSERS,
        "test_quiet.py": TEST_QUIET,
        "test_zz_state.py": TEST_ZZ_STATE,
    }
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    (root / "pytest.ini").write_text("[pytest]\n")
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--strict-markers",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:logging",
            "-rf",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = pytest.RunResult(
        done.returncode,
        done.stdout.splitlines(),
        done.stderr.splitlines(),
        time.monotonic() - start,
    )
    events = json.loads((root / "hook_events.json").read_text())
    return result, events


@pytest.mark.slow
def test_batch_outcomes(batch: tuple[pytest.RunResult, list[dict[str, str]]]) -> None:
    result, _ = batch
    result.assert_outcomes(passed=9, failed=12)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    failed = {
        line.split()[1].split(" ")[0] for line in result.outlines if line.startswith("FAILED ")
    }
    assert failed == {
        "test_marked.py::test_shape_change",
        "test_marked.py::test_float_scaling_change",
        "test_marked.py::test_one_allowed_two_happen",
        "test_marked.py::test_storm_fails_whatever_the_allowance",
        "test_marked.py::test_storm_under_fullgraph_fails_cleanly",
        "test_marked.py::test_setup_recompile_counts",
        "test_marked.py::test_other_failure_shows_recompiles",
        "test_marked.py::TestClassMark::test_recompiles",
        "test_module_mark.py::test_module_marked_recompile",
        "test_diffusers.py::test_unet_lora_rank_change",
        "test_quiet.py::test_quiet_storm[setLevel]",
        "test_quiet.py::test_quiet_storm[set_logs]",
    }


def test_shape_change_names_frame_guard_and_step(batch) -> None:
    result, _ = batch
    result.stdout.fnmatch_lines(
        [
            "*_ test_shape_change _*",
            "no_recompile: 1 recompile (none allowed)",
            # the first compile only: the recompile was refused at its guard
            "1 compile, 1 recompile, 0 graph breaks, * s compiling",
            'recompile after step "hotswap #2: style_b (rank 8)": forward (test_marked.py:*)',
            "   guard: tensor 'self.lin.bias' size mismatch at index 0. expected 4, actual 8*",
            "   stopped at the guard: the allowance was spent, so this recompile was refused *",
        ]
    )


def test_float_change_fails_with_its_guard(batch) -> None:
    result, _ = batch
    result.stdout.fnmatch_lines(
        [
            "*_ test_float_scaling_change _*",
            "no_recompile: 1 recompile (none allowed)",
            "*",
            'recompile after step "strength 0.5": forward (test_marked.py:*)',
            "   guard: self.scale == 1.0",
        ]
    )


def test_allowance_storm_setup_and_module_marks(batch) -> None:
    result, _ = batch
    result.stdout.fnmatch_lines(
        ["*_ test_one_allowed_two_happen _*", "no_recompile: 2 recompiles (1 allowed)"]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_storm_fails_whatever_the_allowance _*",
            "no_recompile: 1 recompile (100 allowed)",
            "*",
            "recompile storm (recompile_limit hit, the frame now runs eagerly) before any step: double (*)",
            "   guard: tensor 'x' dtype mismatch. expected Float, actual Double",
        ]
    )
    # fullgraph turns the storm into dynamo's FailOnRecompileLimitHit: the same clean failure
    result.stdout.fnmatch_lines(
        [
            "*_ test_storm_under_fullgraph_fails_cleanly _*",
            "no_recompile: 1 recompile (none allowed)",
            "*",
            "recompile storm (recompile_limit hit, the frame now runs eagerly) before any step: halve (*)",
        ]
    )
    assert "FailOnRecompileLimitHit" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*_ test_setup_recompile_counts _*",
            "no_recompile: 1 recompile*",
            "*",
            "recompile before any step: triple (*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*_ test_module_marked_recompile _*", "no_recompile: 1 recompile*"]
    )
    result.stdout.fnmatch_lines(
        ["*_ TestClassMark.test_recompiles _*", "no_recompile: 1 recompile*"]
    )


def test_storm_fails_when_a_fixture_quiets_dynamo(batch) -> None:
    """Issue 11: with dynamo's logger quieted (``setLevel`` or ``torch._logging.set_logs``), the
    storm is read from dynamo's compile metrics; the quiet twin that stays under
    ``recompile_limit`` passes (test_batch_outcomes)."""
    result, _ = batch
    for how in ("setLevel", "set_logs"):
        result.stdout.fnmatch_lines(
            [
                f"*_ test_quiet_storm[[]{how}[]] _*",
                "no_recompile: * recompiles (100 allowed)",
                "*",
                "recompile storm (recompile_limit hit, the frame now runs eagerly) before any "
                "step: scaled (test_quiet.py:32)",
                "   guard: G['MODE'] == 'mmmmmmmm'",
            ]
        )


def test_other_failure_still_shows_recompiles(batch) -> None:
    result, _ = batch
    result.stdout.fnmatch_lines(
        [
            "*_ test_other_failure_shows_recompiles _*",
            "*AssertionError: unrelated bug*",
            "*- hotswap recompiles (call) -*",
            "* compiles, 1 recompile*",
            'recompile after step "before the bug": forward (test_marked.py:*)',
            "   guard: self.scale == 1.0",
        ]
    )


def test_real_diffusers_frame_and_lora_guard(batch) -> None:
    result, _ = batch
    result.stdout.fnmatch_lines(
        [
            "*_ test_unet_lora_rank_change _*",
            "no_recompile: 1 recompile (none allowed)",
            "*",
            'recompile after step "hotswap #2: style_b (rank 8)": '
            "wrapper (diffusers/utils/peft_utils.py:300)",
            "   guard: tensor '*...*to_k.lora_A.default.weight' size mismatch at index 0. "
            "expected 4, actual 8*",
        ]
    )


def test_recompile_hook_gets_every_event(batch) -> None:
    _, events = batch
    by_test = {event["test"]: event for event in events}
    # one per recompile, including the unmarked but watched tests
    assert len(events) == 33
    assert by_test["test_shape_change"]["step"] == "hotswap #2: style_b (rank 8)"
    assert "size mismatch" in by_test["test_shape_change"]["reason"]
    assert by_test["test_storm_fails_whatever_the_allowance"]["kind"] == "storm"
    assert by_test["test_storm_under_fullgraph_fails_cleanly"]["kind"] == "storm"
    assert by_test["test_unet_lora_rank_change"]["frame"] == "wrapper"
    assert "test_unwatched_recompile_passes" not in by_test
    assert "test_one_allowed_one_happens" in by_test
    assert "test_clean_in_place_update" not in by_test
    for how in ("setLevel", "set_logs"):
        storm = [event["kind"] for event in events if event["test"] == f"test_quiet_storm[{how}]"]
        assert storm == ["recompile"] * 7 + ["storm"], how
        quiet = [
            event["kind"] for event in events if event["test"] == f"test_quiet_no_storm[{how}]"
        ]
        assert quiet == ["recompile"] * 2, how


STRICT_FILE = """
import torch


def test_strict_clean():
    def add(x):
        return x + 5
    compiled = torch.compile(add, backend="eager")
    compiled(torch.ones(2))
    compiled(torch.ones(2))


def test_strict_recompile():
    def mul(x, k):
        return x * k
    compiled = torch.compile(mul, backend="eager")
    compiled(torch.ones(2), 2.0)
    compiled(torch.ones(2), 3.0)
"""


@pytest.mark.slow
def test_hotswap_strict_marks_every_test(pytester: pytest.Pytester) -> None:
    """The unmarked twin of this, test_unwatched_recompile_passes in the batch, passes."""
    pytester.makepyfile(test_strict=STRICT_FILE)
    strict = pytester.runpytest_subprocess("--hotswap-strict", "-p", "no:cacheprovider")
    strict.assert_outcomes(passed=1, failed=1)
    strict.stdout.fnmatch_lines(
        ["*_ test_strict_recompile _*", "no_recompile: 1 recompile (none allowed)"]
    )
