"""``make gpu-check`` on several GPUs: one pytest-xdist worker per GPU, times per device.

No GPU here: the GPU count is made up (``gpu_check.steps(..., gpus=N)``, a fake ``gpu()``), the
reports are written by hand. The no-GPU exit is tested in ``test_bench`` and ``test_gpu_bundle``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pytest_hotswap.bench import gpu_check


def _conformance(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "pytest", "-q", "-p", "no:cacheprovider"),
        *("--pyargs", "pytest_hotswap.conformance"),
        "--hotswap-device=cuda",
        "--hotswap-mode=reduce-overhead",
        f"--hotswap-report={out / 'conformance.json'}",
        f"--junitxml={out / 'conformance.xml'}",
        "--hotswap-quantize=float8-dynamic",
        *extra,
    ]


@pytest.mark.parametrize(
    ("gpus", "extra"),
    [
        (1, ()),
        (2, ("-n", "2", "--dist", "loadgroup", "--hotswap-devices=auto")),
        (4, ("-n", "4", "--dist", "loadgroup", "--hotswap-devices=auto")),
    ],
)
def test_the_conformance_step_runs_one_worker_per_gpu(tmp_path, gpus, extra) -> None:
    planned = {step.name: step.command for step in gpu_check.steps(tmp_path, (9, 0), gpus)}
    assert planned["conformance"] == _conformance(tmp_path, *extra)
    # The bench steps measure one GPU, whatever the count: no xdist there.
    for name in ("bench-max-autotune-no-cudagraphs", "bench-reduce-overhead"):
        assert "-n" not in planned[name]
        assert "--hotswap-devices=auto" not in planned[name]


def test_one_gpu_is_the_default_and_never_gets_xdist() -> None:
    assert gpu_check.xdist_args(1) == []
    assert gpu_check.xdist_args(0) == []  # never reached (no GPU exits 2), but no "-n 0"
    assert gpu_check.xdist_args(3) == ["-n", "3", "--dist", "loadgroup", "--hotswap-devices=auto"]
    assert gpu_check.steps(Path("out"), (9, 0))[-1].command == _conformance(Path("out"))


def test_gpu_counts_what_torch_sees_and_takes_the_lowest_capability(monkeypatch) -> None:
    import torch

    names = {0: "NVIDIA H100", 1: "NVIDIA A100", 2: "NVIDIA H100"}
    capabilities = {0: (9, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", names.__getitem__)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capabilities.__getitem__)
    found = gpu_check.gpu()
    assert found == gpu_check.Gpus(("NVIDIA H100", "NVIDIA A100", "NVIDIA H100"), (8, 0))
    assert found.count == 3
    assert found.describe() == "2 x NVIDIA H100, 1 x NVIDIA A100, compute capability 8.0"
    # Negative control: the same machine seeing none is the no-GPU error, not an empty Gpus.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(gpu_check.NoGpuError, match="sees none here"):
        gpu_check.gpu()


def _record(nodeid: str, device: str, compile_s: float) -> dict[str, object]:
    return {"nodeid": nodeid, "outcome": "passed", "device": device, "compile_s": compile_s}


def _report(path: Path, *records: dict[str, object]) -> Path:
    path.write_text(json.dumps({"schema_version": 1, "tests": list(records)}))
    return path


def _junit(path: Path, *cases: tuple[str, float, str | None]) -> Path:
    """A JUnit XML as pytest writes it: the device as a property of each watched test case."""
    rows = []
    for name, seconds, device in cases:
        prop = (
            f'<properties><property name="compiles" value="1"/>'
            f'<property name="device" value="{device}"/></properties>'
            if device is not None
            else ""
        )
        rows.append(f'<testcase classname="t" name="{name}" time="{seconds}">{prop}</testcase>')
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
        + "".join(rows)
        + "</testsuite></testsuites>"
    )
    return path


def test_per_device_gives_tests_and_seconds_from_the_report_and_junit(tmp_path) -> None:
    report = _report(
        tmp_path / "conformance.json",
        _record("t.py::a", "cuda:1", 4.0),
        _record("t.py::b", "cuda:0", 1.5),
        _record("t.py::c", "cuda:0", 2.0),
    )
    junit = _junit(
        tmp_path / "conformance.xml",
        ("a", 30.0, "cuda:1"),
        ("b", 10.5, "cuda:0"),
        ("c", 20.0, "cuda:0"),
        ("unwatched", 99.0, None),  # no record, no device property: counted nowhere
    )
    devices = gpu_check.per_device(report, junit)
    assert devices == [
        {"device": "cuda:0", "tests": 2, "compile_s": 3.5, "test_s": 30.5},
        {"device": "cuda:1", "tests": 1, "compile_s": 4.0, "test_s": 30.0},
    ]
    assert gpu_check.per_device_lines(devices) == [
        "per device: cuda:0: 2 tests, 30.5 s (3.5 s compiling)",
        "per device: cuda:1: 1 test, 30.0 s (4.0 s compiling)",
    ]


def test_per_device_negative_controls(tmp_path) -> None:
    # One device: one line holding every test, no split by anything else.
    report = _report(
        tmp_path / "one.json", _record("t.py::a", "cuda:0", 1.0), _record("t.py::b", "cuda:0", 2.0)
    )
    junit = _junit(tmp_path / "one.xml", ("a", 5.0, "cuda:0"), ("b", 6.0, "cuda:0"))
    assert gpu_check.per_device_lines(gpu_check.per_device(report, junit)) == [
        "per device: cuda:0: 2 tests, 11.0 s (3.0 s compiling)"
    ]
    # A record without a device (an older report), and no JUnit XML: said so, not made up.
    old = _report(tmp_path / "old.json", _record("t.py::a", "", 1.0))
    assert gpu_check.per_device_lines(gpu_check.per_device(old, tmp_path / "missing.xml")) == [
        "per device: unknown: 1 test, ? s (no JUnit XML) (1.0 s compiling)"
    ]
    # No report (the step was stopped), or not a hotswap report: nothing per device.
    assert gpu_check.per_device(tmp_path / "missing.json", junit) == []
    (tmp_path / "other.json").write_text(json.dumps({"schema_version": 1}))
    assert gpu_check.per_device(tmp_path / "other.json", junit) == []
    assert gpu_check.per_device_lines([]) == ["per device: none (no conformance report)"]


def test_run_plans_for_the_gpus_it_sees_and_reports_per_device(
    monkeypatch, capsys, tmp_path
) -> None:
    planned: list[tuple[tuple[int, int], int]] = []
    made_up = tmp_path / "made-up"
    made_up.mkdir()
    _report(
        made_up / "conformance.json",
        _record("t.py::a", "cuda:0", 1.0),
        _record("t.py::b", "cuda:1", 2.0),
    )
    _junit(made_up / "conformance.xml", ("a", 3.0, "cuda:0"), ("b", 4.0, "cuda:1"))
    out_dir = tmp_path / "gpu"
    # The conformance step writes the made-up report and JUnit XML where the real one would.
    copy = f"import shutil; shutil.copytree({str(made_up)!r}, {str(out_dir)!r}, dirs_exist_ok=True)"

    def steps(out: Path, capability: tuple[int, int], gpus: int) -> list[gpu_check.Step]:
        planned.append((capability, gpus))
        return [gpu_check.Step("conformance", [sys.executable, "-c", copy])]

    monkeypatch.setattr(gpu_check, "gpu", lambda: gpu_check.Gpus(("Fake GPU",) * 2, (9, 0)))
    monkeypatch.setattr(gpu_check, "steps", steps)
    assert gpu_check.run(out_dir, budget_s=60) == 0
    assert planned == [((9, 0), 2)]
    out = capsys.readouterr().out
    assert (
        "gpu-check: 2 x Fake GPU, compute capability 9.0, "
        "conformance in one pytest-xdist worker per GPU, into " in out
    )
    assert "gpu-check: per device: cuda:0: 1 test, 3.0 s (1.0 s compiling)\n" in out
    assert "gpu-check: per device: cuda:1: 1 test, 4.0 s (2.0 s compiling)\n" in out
    summary = json.loads((out_dir / "gpu-check.json").read_text())
    assert summary["gpus"] == ["Fake GPU", "Fake GPU"]
    assert summary["per_device"] == [
        {"device": "cuda:0", "tests": 1, "compile_s": 1.0, "test_s": 3.0},
        {"device": "cuda:1", "tests": 1, "compile_s": 2.0, "test_s": 4.0},
    ]

    # Negative control: a conformance step that writes nothing (stopped at its limit) leaves the
    # earlier run's report behind in the folder; it is not counted again.
    monkeypatch.setattr(
        gpu_check,
        "steps",
        lambda out, capability, gpus: [gpu_check.Step("conformance", [sys.executable, "-c", ""])],
    )
    assert gpu_check.run(out_dir, budget_s=60) == 0
    assert "gpu-check: per device: none (no conformance report)\n" in capsys.readouterr().out
    assert json.loads((out_dir / "gpu-check.json").read_text())["per_device"] == []


def test_the_dry_run_collects_the_conformance_step_for_one_and_two_gpus(tmp_path) -> None:
    """``make gpu-check-dry`` (not run here: it downloads torch 2.11) rehearses both command
    lines on the image's pytest-xdist; the one-GPU one without xdist (the negative control)."""
    from pytest_hotswap.bench import bundle

    commands = {name: args for name, args, _, _ in bundle.dry_commands("py", tmp_path)}
    collect = tmp_path / "collect"
    assert commands["collect-gpu-conformance"] == [
        "py",
        *_conformance(collect)[1:],
        "--collect-only",
    ]
    assert commands["collect-gpu-conformance-2-gpus"] == [
        "py",
        *_conformance(collect, "-n", "2", "--dist", "loadgroup", "--hotswap-devices=auto")[1:],
        "--collect-only",
    ]
    assert commands["no-gpu"] == [
        *("py", "-m", "pytest_hotswap.bench", "--gpu-check", "--out", f"{tmp_path}/no-gpu")
    ]
