"""Options, ini twins, usage errors, markers, header and the cost of loading the plugin.

These runs never compile anything, so they run in process (``runpytest_inprocess``), except the
import check, which needs a fresh interpreter. A watched test imports ``torch._dynamo``; it is
imported here first, because pytester drops modules first imported inside an in-process run and
torch cannot be imported twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch._dynamo

SHOW_OPTIONS = """
def test_show(hotswap_options):
    print("OPTIONS", hotswap_options)
"""


def test_help_lists_every_option_and_ini_key(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "LoRA hotswap without recompiles (pytest-hotswap):",
            "*--hotswap-max-rank=MAX_RANK*",
            "*--hotswap-backend=BACKEND*",
            "*--hotswap-mode=MODE*",
            "*--hotswap-device=DEVICE*",
            "*--hotswap-dtype=DTYPE*",
            "*--hotswap-quantize=QUANTIZE*",
            "*--hotswap-pipelines=PIPELINES*",
            "*--hotswap-implementations=IMPLEMENTATIONS*",
            "*--hotswap-adapters=ADAPTERS*",
            "*--hotswap-strict*",
            "*--hotswap-fresh*",
            "*--hotswap-count-all*",
            "*--hotswap-report=REPORT*",
            "*--hotswap-baseline=BASELINE*",
            "*--hotswap-fail-on=FAIL_ON*",
        ]
    )
    result.stdout.fnmatch_lines(["*hotswap_max_rank (string):*", "*hotswap_strict (bool):*"])


def test_markers_are_listed_with_their_signature(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.no_recompile(max_recompiles=0, fresh=False, count_all=False): fail the "
            "test when dynamo recompiles*",
            "@pytest.mark.hotswap(pipeline=None, max_rank=None, backend=None, quantize=None, "
            "compile_scope=None): *",
        ]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--hotswap-max-rank=0"],
            "--hotswap-max-rank=0: expected an integer >= 1 or 'auto', got 0",
        ),
        (
            ["--hotswap-max-rank=abc"],
            "--hotswap-max-rank=abc: expected an integer >= 1 or 'auto', got 'abc'",
        ),
        (
            ["--hotswap-max-rank=auto"],
            "--hotswap-max-rank=auto takes the largest rank of the adapter catalog, but no "
            "catalog is given: add --hotswap-adapters=DIR|GLOB*",
        ),
        (
            ["--hotswap-adapters=no/such/folder"],
            "--hotswap-adapters=no/such/folder: no such folder, and not a glob pattern*",
        ),
        (
            ["--hotswap-pipelines=sd,./not-a-pipeline"],
            "--hotswap-pipelines: './not-a-pipeline': no registered pipeline of that name*",
        ),
        (
            ["--hotswap-backend=foo"],
            "--hotswap-backend=foo: expected one of eager, aot_eager, inductor; got 'foo'",
        ),
        (["--hotswap-mode=fast"], "--hotswap-mode=fast: expected one of default, reduce-overhead*"),
        (
            ["--hotswap-device=tpu"],
            "--hotswap-device=tpu: expected one of auto, cpu, cuda; got 'tpu'",
        ),
        (["--hotswap-dtype=int8"], "--hotswap-dtype=int8: expected one of auto, float32*"),
        (["--hotswap-quantize=int4"], "--hotswap-quantize=int4: expected one of none*"),
        (
            ["--hotswap-implementations=nope"],
            "--hotswap-implementations=nope: unknown nope; expected names from diffusers, peft, "
            "reference",
        ),
        (["--hotswap-pipelines=,"], "--hotswap-pipelines=,: expected a comma-separated list*"),
        (
            ["--hotswap-fail-on=nonsense"],
            "--hotswap-fail-on=nonsense: bad threshold 'nonsense': expected METRIC:N*",
        ),
    ],
)
def test_bad_option_is_a_usage_error(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    result = pytester.runpytest_inprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nhotswap_backend = foo\n")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: ini option hotswap_backend=foo: expected one of eager, aot_eager, inductor*"]
    )


@pytest.mark.parametrize(
    ("ini", "args", "expected"),
    [
        ("", [], "max_rank=128, backend='inductor'"),
        ("hotswap_max_rank = 64\nhotswap_backend = eager\n", [], "max_rank=64, backend='eager'"),
        (
            "hotswap_max_rank = 64\nhotswap_backend = eager\n",
            ["--hotswap-max-rank=32", "--hotswap-backend=aot_eager"],
            "max_rank=32, backend='aot_eager'",
        ),
    ],
    ids=["default", "ini", "command-line-beats-ini"],
)
def test_precedence(pytester: pytest.Pytester, ini: str, args: list[str], expected: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}")
    pytester.makepyfile(test_show=SHOW_OPTIONS)
    result = pytester.runpytest_inprocess("-s", *args)
    result.assert_outcomes(passed=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # how `auto` resolves on this host
    result.stdout.fnmatch_lines([f"*OPTIONS HotswapOptions({expected}, *device='{device}'*"])


def test_every_field_from_the_command_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_show=SHOW_OPTIONS)
    result = pytester.runpytest_inprocess(
        "-s",
        "--hotswap-mode=reduce-overhead",
        "--hotswap-device=cpu",
        "--hotswap-dtype=bfloat16",
        "--hotswap-quantize=int8-weight-only",
        "--hotswap-pipelines=flux,mine",
        "--hotswap-implementations=reference",
        "--hotswap-strict",
        "--hotswap-report=out.json",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*OPTIONS HotswapOptions(max_rank=128, backend='inductor', mode='reduce-overhead', "
            "device='cpu', dtype='bfloat16', quantize='int8-weight-only', "
            "pipelines=('flux', 'mine'), implementations=('reference',), adapters=None, "
            "strict=True, fresh=False, count_all=False, report=PosixPath('out.json'), "
            "baseline=None, fail_on=None, devices='auto', compile_cache=None, "
            "compile_scope='whole')"
        ]
    )


def test_ini_paths_are_relative_to_the_ini_file_and_cli_paths_to_the_invocation_dir(
    pytester: pytest.Pytester,
) -> None:
    config_dir = pytester.mkdir("config")
    elsewhere = pytester.mkdir("elsewhere")
    (config_dir / "pytest.ini").write_text(
        "[pytest]\nhotswap_report = out/report.json\nhotswap_baseline = base.json\n"
    )
    # A valid baseline, or the run stops at "no such file".
    (config_dir / "base.json").write_text(
        (Path(__file__).parent / "data" / "report_baseline.json").read_text()
    )
    pytester.makepyfile(test_show=SHOW_OPTIONS)
    args = ("-s", "-c", "config/pytest.ini", f"--rootdir={elsewhere}", "test_show.py")
    result = pytester.runpytest_inprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"*report=PosixPath('{config_dir}/out/report.json'), "
            f"baseline=PosixPath('{config_dir}/base.json')*"
        ]
    )
    result = pytester.runpytest_inprocess(*args, "--hotswap-report=cli.json")
    result.stdout.fnmatch_lines(["*report=PosixPath('cli.json'), *"])


def test_ini_strict_flag(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nhotswap_strict = true\n")
    pytester.makepyfile(test_show=SHOW_OPTIONS)
    result = pytester.runpytest_inprocess("-s")
    result.stdout.fnmatch_lines(["*OPTIONS *strict=True*"])


@pytest.mark.parametrize(
    ("mark", "message"),
    [
        (
            "no_recompile(maximum=1)",
            "test_marked.py::test_it: @pytest.mark.no_recompile got unexpected arguments "
            "(maximum=); accepted: max_recompiles=N, fresh=True|False, count_all=True|False",
        ),
        (
            "no_recompile(max_recompiles=-1)",
            "test_marked.py::test_it: @pytest.mark.no_recompile(max_recompiles=-1): "
            "expected an integer >= 0",
        ),
        (
            "no_recompile(max_recompiles='2')",
            "test_marked.py::test_it: @pytest.mark.no_recompile(max_recompiles='2'): "
            "expected an integer >= 0",
        ),
    ],
)
def test_bad_marker_is_a_usage_error(pytester: pytest.Pytester, mark: str, message: str) -> None:
    pytester.makepyfile(
        test_marked=f"import pytest\n\n@pytest.mark.{mark}\ndef test_it():\n    pass\n"
    )
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_marker_positional_allowance_is_accepted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marked="import pytest\n\n@pytest.mark.no_recompile(2)\ndef test_it():\n    pass\n"
    )
    pytester.runpytest_inprocess("--strict-markers").assert_outcomes(passed=1)


def test_header_line(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--hotswap-max-rank=64", "--hotswap-backend=eager")
    result.stdout.fnmatch_lines(
        [
            # auto device and dtype stay unresolved: resolving them would import torch
            "hotswap: torch 2.13*, diffusers *, peft *, transformers * | max_rank=64 "
            "backend=eager mode=default device=auto dtype=auto quantize=none compile=whole "
            "pipelines=sd,flux "
            "implementations=diffusers,reference"
        ]
    )


def test_loading_the_plugin_and_help_import_no_torch(pytester: pytest.Pytester) -> None:
    code = (
        "import sys, pytest\n"
        "import pytest_hotswap.plugin\n"
        "loaded = sorted(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules)\n"
        "pytest.main(['--help', '-q'])\n"
        "after_help = sorted(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules)\n"
        "print('HEAVY', loaded, after_help)\n"
    )
    result = pytester.run(sys.executable, "-c", code)
    result.stdout.fnmatch_lines(["HEAVY [] []"])


PLAIN_SUITE_CONFTEST = """
import sys


def pytest_sessionfinish(session):
    heavy = sorted(m for m in ("torch", "diffusers", "peft") if m in sys.modules)
    print("HEAVY", ",".join(heavy) or "none")
"""


@pytest.mark.slow
def test_a_session_that_uses_no_hotswap_feature_never_imports_torch(
    pytester: pytest.Pytester,
) -> None:
    """An installed plugin costs nothing where it is not used: no torch import, no resolving
    ``auto`` device (``make bench`` measures the whole-process difference)."""
    pytester.makeconftest(PLAIN_SUITE_CONFTEST)
    pytester.makepyfile(
        test_plain="import pytest\n\n@pytest.mark.parametrize('n', range(5))\ndef test_n(n):\n    assert n < 5\n"
    )
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*HEAVY none"])
    assert "hotswap:" not in result.stdout.str()  # nothing to say in a session that does not use it
    # The negative control: a marked test is hotswap use, and watching it needs torch.
    pytester.makepyfile(
        test_marked="import pytest\n\n@pytest.mark.no_recompile\ndef test_it():\n    pass\n"
    )
    marked = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "test_marked.py")
    marked.stdout.fnmatch_lines(["hotswap: torch *", "*HEAVY torch"])
