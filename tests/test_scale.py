"""``--hotswap-devices`` (one GPU per xdist worker) and ``--hotswap-compile-cache`` (torch's
compile caches in a directory or a Redis shared by workers and runs).

No GPU is needed: the GPU count comes from the plugin's private testing hook
``PYTEST_HOTSWAP_FAKE_GPUS`` (or a fake ``nvidia-smi`` on ``PATH``); what a worker sees is its
``CUDA_VISIBLE_DEVICES``. The Redis tests start the Debian ``redis-server`` on a free port.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pytest_hotswap import scale
from pytest_hotswap.options import parse_compile_cache, parse_devices

pytestmark = pytest.mark.xdist_group("scale")

SHOW_DEVICE = """
import os

def test_where(compile_watcher):
    print("PINNED", os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("CUDA_VISIBLE_DEVICES"))
"""

# One small inductor graph, and a marked test whose shape change is refused at the guard (no
# second compile): the same two verdicts in every run, whatever the cache holds.
COMPILED = """
import pytest
import torch


def model_and_input(rows):
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4), torch.randn(rows, 8)


def test_linear(compile_watcher):
    model, x = model_and_input(2)
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.no_recompile
def test_shape_change(compile_watcher):
    model, x = model_and_input(2)
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        compiled(x)
        compiled(torch.randn(3, 8))
"""
COUNTER_NAMES = [name for _, name in scale.CACHE_COUNTERS]


# --- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", "auto"), ("2", 2), ("cuda:0,cuda:2", (0, 2)), (" cuda:1 , cuda:1 ", (1,))],
)
def test_parse_devices(text, expected):
    assert parse_devices(text) == expected


@pytest.mark.parametrize("text", ["0", "gpu0", "cuda:x", "cuda:0,cpu", "cuda", ""])
def test_parse_devices_refuses(text):
    with pytest.raises(ValueError, match="auto, a number of GPUs >= 1"):
        parse_devices(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (".cache/inductor", ".cache/inductor"),
        ("redis://127.0.0.1:6390", "redis://127.0.0.1:6390"),
        ("redis://cache.local", "redis://cache.local:6379"),
    ],
)
def test_parse_compile_cache(text, expected):
    assert parse_compile_cache(text) == expected


@pytest.mark.parametrize("text", ["http://host:1", "redis://", "redis://h:99999", "redis://h:1/2"])
def test_parse_compile_cache_refuses(text):
    with pytest.raises(ValueError, match="redis://HOST:PORT"):
        parse_compile_cache(text)


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        (None, ("0", "1", "2", "3")),
        ("3,1", ("3", "1")),
        ("2,7,1", ("2",)),  # CUDA stops at the first index past the last GPU
        ("-1", ()),
        ("", ()),
        ("GPU-5d1f,0", ("GPU-5d1f", "0")),
    ],
)
def test_visible_gpus_honour_cuda_visible_devices(allowed, expected):
    env = {scale.FAKE_GPUS_ENV: "4"}
    if allowed is not None:
        env[scale.CUDA_VISIBLE] = allowed
    assert scale.visible_gpus(env) == expected


def test_gpu_count_reads_nvidia_smi_on_path(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"\n'
        'echo "  MIG 1g.10gb     Device  0: (UUID: MIG-bbbb)"\n'
        'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)"\n'
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert scale.gpu_count({}) == 2  # MIG lines are not GPUs of their own
    smi.unlink()
    assert scale.gpu_count({}) == 0  # no nvidia-smi: a host without a GPU


def test_plan_devices():
    visible = ("3", "1", "2")
    labels = lambda plan: [(d.label, d.entry) for d in plan]  # noqa: E731
    assert labels(scale.plan_devices("auto", visible)) == [
        ("cuda:0", "3"),
        ("cuda:1", "1"),
        ("cuda:2", "2"),
    ]
    assert labels(scale.plan_devices(2, visible)) == [("cuda:0", "3"), ("cuda:1", "1")]
    assert labels(scale.plan_devices((2, 0), visible)) == [("cuda:2", "2"), ("cuda:0", "3")]
    assert scale.plan_devices("auto", ()) == ()  # no GPU: the CPU, nothing pinned
    with pytest.raises(scale.ScaleError, match="asks for 4 GPUs but this host shows 3 GPUs"):
        scale.plan_devices(4, visible)
    with pytest.raises(scale.ScaleError, match="cuda:3: this host shows 3 GPUs"):
        scale.plan_devices((0, 3), visible)
    with pytest.raises(scale.ScaleError, match="lists CUDA devices but this host shows 0 GPUs"):
        scale.plan_devices((0,), ())


def test_device_for_worker_is_k_mod_n():
    plan = (scale.Device("cuda:0", "0"), scale.Device("cuda:1", "1"))
    assert [scale.device_for_worker(plan, f"gw{k}").label for k in range(5)] == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
        "cuda:1",
        "cuda:0",
    ]
    assert scale.device_for_worker(plan, None).label == "cuda:0"
    assert scale.device_for_worker((), "gw1") is None


def test_cache_env(tmp_path):
    assert scale.cache_env("c", tmp_path) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c")}
    assert scale.cache_env("redis://10.0.0.5:6380", tmp_path) == {
        "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_REDIS_HOST": "10.0.0.5",
        "TORCHINDUCTOR_REDIS_PORT": "6380",
        "TORCHINDUCTOR_REDIS_URL": None,
    }


# --- device pinning through the plugin --------------------------------------------------------


def pinned(result: pytest.RunResult) -> dict[str, str]:
    """``{worker: CUDA_VISIBLE_DEVICES}`` from the PINNED lines the test printed."""
    found = {}
    for line in result.outlines:
        if line.startswith("PINNED "):
            _, worker, visible = line.split()
            found[worker] = visible
    return found


def recorded(report: Path) -> list[str]:
    return sorted(test["device"] for test in json.loads(report.read_text())["tests"])


def junit_devices(junit: Path) -> list[str]:
    root = ET.parse(junit).getroot()
    return sorted(p.get("value") for p in root.iter("property") if p.get("name") == "device")


@pytest.mark.slow
def test_each_xdist_worker_is_pinned_to_its_device(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when this suite runs under xdist
    # Four GPUs, of which the parent allows 3, 1 and 2 (so cuda:0 is GPU 3): the list cuda:2,
    # cuda:0 gives worker 0 GPU 2, worker 1 GPU 3, worker 2 GPU 2 again (K mod N).
    monkeypatch.setenv(scale.FAKE_GPUS_ENV, "4")
    monkeypatch.setenv(scale.CUDA_VISIBLE, "3,1,2")
    pytester.makepyfile(test_where=SHOW_DEVICE)
    report, junit = pytester.path / "r.json", pytester.path / "j.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "3", "--dist", "each", "-rA",
        "--hotswap-devices=cuda:2,cuda:0", "--hotswap-device=cuda",
        f"--hotswap-report={report}", f"--junitxml={junit}",
    )  # fmt: skip
    result.assert_outcomes(passed=3)
    assert pinned(result) == {"gw0": "2", "gw1": "3", "gw2": "2"}
    assert recorded(report) == ["cuda:0", "cuda:2", "cuda:2"]
    assert junit_devices(junit) == ["cuda:0", "cuda:2", "cuda:2"]
    result.stdout.fnmatch_lines(
        [
            "per device:",
            "  device  tests  compiles  recompiles  compile s",
            "  cuda:0  1      0         0           0.00",
            "  cuda:2  2      0         0           0.00",
        ]
    )


@pytest.mark.slow
def test_without_xdist_the_first_device(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when this suite runs under xdist
    monkeypatch.setenv(scale.FAKE_GPUS_ENV, "4")
    monkeypatch.setenv(scale.CUDA_VISIBLE, "3,1,2")
    pytester.makepyfile(test_where=SHOW_DEVICE)
    report = pytester.path / "r.json"
    args = ("-p", "no:cacheprovider", "-p", "no:xdist", "-rA", "--hotswap-device=cuda")
    result = pytester.runpytest_subprocess(
        *args, "--hotswap-devices=cuda:2,cuda:0", f"--hotswap-report={report}"
    )
    result.assert_outcomes(passed=1)
    assert pinned(result) == {"None": "2"}
    assert recorded(report) == ["cuda:2"]
    # auto without xdist changes nothing: its first GPU is already cuda:0.
    result = pytester.runpytest_subprocess(*args, f"--hotswap-report={report}")
    assert pinned(result) == {"None": "3,1,2"}
    assert recorded(report) == ["cuda:0"]


@pytest.mark.slow
def test_on_a_host_without_a_gpu_auto_is_the_cpu_and_nothing_changes(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when this suite runs under xdist
    monkeypatch.setenv(scale.FAKE_GPUS_ENV, "0")
    monkeypatch.delenv(scale.CUDA_VISIBLE, raising=False)
    pytester.makepyfile(test_where=SHOW_DEVICE)
    report = pytester.path / "r.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "-n", "2", "--dist", "each", f"--hotswap-report={report}"
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    assert pinned(result) == {"gw0": "None", "gw1": "None"}
    # --hotswap-device=auto still decides cpu or cuda (a CUDA torch on a host nvidia-smi misses).
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert recorded(report) == [device, device]
    if device == "cpu":
        result.stdout.no_fnmatch_line("per device:")


@pytest.mark.parametrize(
    ("gpus", "args", "message"),
    [
        ("4", ["--hotswap-devices=cuda:0,cuda:4"], "*cuda:4: this host shows 4 GPUs, cuda:0 to*"),
        ("0", ["--hotswap-devices=cuda:0"], "*lists CUDA devices but this host shows 0 GPUs*"),
        ("2", ["--hotswap-devices=3"], "*asks for 3 GPUs but this host shows 2 GPUs*"),
        ("2", ["--hotswap-devices=gpu1"], "*--hotswap-devices=gpu1: expected auto, a number*"),
        (
            "2",
            ["--hotswap-devices=cuda:1", "--hotswap-device=cpu"],
            "*--hotswap-devices=cuda:1 asks for GPUs but --hotswap-device=cpu*",
        ),
    ],
    ids=["past-the-last", "no-gpu", "too-many", "syntax", "cpu"],
)
def test_a_bad_device_list_is_a_usage_error(pytester, monkeypatch, gpus, args, message):
    monkeypatch.setenv(scale.FAKE_GPUS_ENV, gpus)
    monkeypatch.delenv(scale.CUDA_VISIBLE, raising=False)
    pytester.makepyfile(test_where=SHOW_DEVICE)
    result = pytester.runpytest_inprocess("-p", "no:xdist", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    assert os.environ.get(scale.CUDA_VISIBLE) is None  # nothing left pinned


# --- compile caches ---------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path) -> Iterator[str]:
    """A private ``redis-server`` on 127.0.0.1 and a free port (no disk persistence)."""
    if scale.redis_server_binary() is None:
        pytest.skip(
            "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
        )
    with scale.local_redis(tmp_path) as location:
        yield location


def test_local_redis_answers_inside_the_block_and_is_gone_after(redis_server, tmp_path):
    pytest.importorskip("redis", reason="the cache extra (redis) is not installed")
    scale.check_redis(redis_server)  # raises when nothing answers
    with scale.local_redis(tmp_path) as location:  # no persistence: one directory is enough
        scale.check_redis(location)
        assert location != redis_server  # a port of its own
    with pytest.raises(scale.ScaleError, match=r"no Redis answers at 127\.0\.0\.1:"):
        scale.check_redis(location, timeout=0.5)  # stopped with the block


def test_local_redis_without_the_binary_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert scale.redis_server_binary() is None
    with (
        pytest.raises(scale.ScaleError, match="redis-server is not installed"),
        scale.local_redis(tmp_path),
    ):
        pass


def compiled_run(pytester, cache_dir: Path, *args: str) -> tuple[dict[str, str], dict[str, int]]:
    """One run of the compiled suite in its own inductor directory: (verdicts, cache counters)."""
    report = cache_dir.with_suffix(".json")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--hotswap-report={report}", *args
    )
    result.assert_outcomes(passed=1, failed=1)
    data = json.loads(report.read_text())
    verdicts = {test["nodeid"]: test["outcome"] for test in data["tests"]}
    result.stdout.fnmatch_lines(["*hotswap compile cache*", "fx graphs: *"])
    return verdicts, {name: data["compile_cache"][name] for name in COUNTER_NAMES}


EXPECTED_VERDICTS = {
    "test_compiled.py::test_linear": "passed",
    "test_compiled.py::test_shape_change": "failed",
}


@pytest.mark.slow
def test_a_second_run_sharing_redis_hits_for_every_graph(pytester, monkeypatch, redis_server):
    pytest.importorskip("redis", reason="the cache extra (redis) is not installed")
    pytester.makepyfile(test_compiled=COMPILED)
    counters = []
    for name in ("first", "second"):  # two fresh local directories: only Redis is shared
        cache_dir = pytester.mkdir(name)
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        verdicts, counted = compiled_run(
            pytester, cache_dir, f"--hotswap-compile-cache={redis_server}"
        )
        assert verdicts == EXPECTED_VERDICTS
        counters.append(counted)
    first, second = counters
    assert first["fxgraph_cache_miss"] >= 1  # the first run wrote
    for kind in ("fxgraph", "autograd"):  # the second, with an empty directory, hit every lookup
        assert second[f"{kind}_cache_miss"] == 0 and second[f"{kind}_cache_bypass"] == 0
        assert (
            second[f"{kind}_cache_hit"] == first[f"{kind}_cache_hit"] + first[f"{kind}_cache_miss"]
        )
    # Negative control: the same fresh start without the Redis misses again.
    cache_dir = pytester.mkdir("third")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    report = cache_dir.with_suffix(".json")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--hotswap-report={report}")
    result.assert_outcomes(passed=1, failed=1)
    assert json.loads(report.read_text())["compile_cache"]["fxgraph_cache_miss"] >= 1


def test_an_unreachable_redis_is_one_usage_error_at_start(pytester):
    pytest.importorskip("redis", reason="the cache extra (redis) is not installed")
    port = scale.free_port()  # nothing listens there
    pytester.makepyfile(test_a="def test_a(compile_watcher): pass")
    started = time.monotonic()
    result = pytester.runpytest_inprocess(f"--hotswap-compile-cache=redis://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: --hotswap-compile-cache=redis://127.0.0.1:{port}: no Redis answers at *"]
    )
    assert sum("no Redis answers" in line for line in result.errlines) == 1
    assert "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE" not in os.environ  # nothing left behind


@pytest.mark.slow
def test_a_cache_directory_shared_by_two_workers(pytester, monkeypatch):
    # Both workers compile the same graph into one directory at the same time (--dist each);
    # then a serial run from that directory hits for every graph: no entry was corrupted.
    pytester.makepyfile(test_compiled=COMPILED)
    shared = pytester.path / "shared-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(pytester.path / "unused"))
    report = pytester.path / "xdist.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--dist", "each",
        f"--hotswap-compile-cache={shared}", f"--hotswap-report={report}",
    )  # fmt: skip
    result.assert_outcomes(passed=2, failed=2)
    data = json.loads(report.read_text())
    assert sorted((t["nodeid"], t["outcome"]) for t in data["tests"]) == sorted(
        2 * list(EXPECTED_VERDICTS.items())
    )
    both = data["compile_cache"]  # summed over the two workers
    assert both["fxgraph_cache_miss"] >= 1 and both["fxgraph_cache_bypass"] == 0
    assert not (pytester.path / "unused").exists()  # the option, not the variable, decided
    verdicts, counted = compiled_run(
        pytester, shared, "-p", "no:xdist", f"--hotswap-compile-cache={shared}"
    )
    assert verdicts == EXPECTED_VERDICTS
    # Every lookup a worker made now hits what the two of them wrote.
    assert counted["fxgraph_cache_miss"] == 0 and counted["fxgraph_cache_bypass"] == 0
    assert (
        2 * counted["fxgraph_cache_hit"] == both["fxgraph_cache_hit"] + both["fxgraph_cache_miss"]
    )
