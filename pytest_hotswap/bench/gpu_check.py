"""``python -m pytest_hotswap.bench --gpu-check --out DIR``: one prepared check on the CUDA GPUs.

On a machine with CUDA GPUs and no network it runs, each step in its own process, each writing
under ``DIR``:

1. the bench in GPU mode (bf16, inductor ``max-autotune-no-cudagraphs``, torchao float8-dynamic
   when the compute capability is >= 8.9), every measurement that touches the GPU:
   ``DIR/bench-max-autotune-no-cudagraphs/``;
2. the stall and end-to-end measurements again with inductor ``reduce-overhead`` (CUDA graphs):
   ``DIR/bench-reduce-overhead/``;
3. the conformance suite with ``--hotswap-device=cuda --hotswap-mode=reduce-overhead`` (plus
   ``--hotswap-quantize=float8-dynamic`` at compute capability >= 8.9): ``DIR/conformance.json``
   (its report) and ``DIR/conformance.xml`` (JUnit). Where torch sees several GPUs it runs one
   pytest-xdist worker per GPU (``-n <GPUs> --dist loadgroup --hotswap-devices=auto``:
   :func:`xdist_args`), and the check reports tests and seconds per device
   (:func:`per_device`); the bench steps run on the first GPU.

Every step's output goes to ``DIR/<step>.log``; ``DIR/gpu-check.json`` says what ran, how long,
how it ended, and the per-device totals. The whole check has ``BUDGET_S`` (8 minutes on an
H100-class GPU), each bench step at most its ``BENCH_CAPS_S`` so the conformance suite keeps the
rest; a step still running at its limit is stopped (its process group killed) and fails the
check. Exit status: 0 when
every step passed, 1 when one failed, 2 when there is no CUDA GPU (nothing is run then).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BUDGET_S = 8 * 60
#: The most each bench step may take, so the conformance suite keeps the rest of the budget;
#: a bench writes its ``results.json`` after every measurement, so a stopped one keeps those.
BENCH_CAPS_S = {"bench-max-autotune-no-cudagraphs": 210, "bench-reduce-overhead": 90}
#: Samples of the costly measurements in the bench steps: every inductor recompile autotunes.
SAMPLES = 2
#: The GPU bench leaves out what does not touch the GPU (the installed plugin's process cost).
GPU_MEASUREMENTS = (
    "swap_latency",
    "recompile_stall",
    "padding_overhead",
    "end_to_end",
    "plugin_overhead",
    "slots",
)
#: The conformance step's hotswap report and JUnit XML, under ``DIR``.
REPORT = "conformance.json"
JUNIT = "conformance.xml"


class NoGpuError(RuntimeError):
    """The check needs a CUDA GPU and found none."""


@dataclasses.dataclass(frozen=True)
class Gpus:
    """What torch sees: the GPUs' names, the lowest compute capability among them (what every
    one of them can run), and how many there are."""

    names: tuple[str, ...]
    capability: tuple[int, int]

    @property
    def count(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        kinds = sorted(set(self.names), key=self.names.index)
        shown = ", ".join(f"{self.names.count(name)} x {name}" for name in kinds)
        return f"{shown}, compute capability {self.capability[0]}.{self.capability[1]}"


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    status: str = "not run"  # passed, failed (exit N), timed out, not run
    seconds: float = 0.0


def gpu() -> Gpus:
    """The GPUs torch sees, or ``NoGpuError`` saying why there is none."""
    import torch

    if torch.version.cuda is None:
        raise NoGpuError(
            f"gpu-check needs a CUDA GPU, but torch {torch.__version__} is a CPU-only build; "
            "install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise NoGpuError(
            f"gpu-check needs a CUDA GPU, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "sees none here (torch.cuda.is_available() is False); run it on a machine with one "
            "NVIDIA GPU and its driver, or check CUDA_VISIBLE_DEVICES"
        )
    indices = range(torch.cuda.device_count())
    return Gpus(
        names=tuple(torch.cuda.get_device_name(index) for index in indices),
        capability=min(torch.cuda.get_device_capability(index) for index in indices),
    )


def xdist_args(gpus: int) -> list[str]:
    """The pytest options for ``gpus`` GPUs: one pytest-xdist worker per GPU, worker K pinned to
    GPU K by ``--hotswap-devices=auto``, each conformance column (pipeline x implementation) on
    one worker (``--dist loadgroup``, as ``make conformance``); none for one GPU."""
    if gpus <= 1:
        return []
    return ["-n", str(gpus), "--dist", "loadgroup", "--hotswap-devices=auto"]


def steps(out: Path, capability: tuple[int, int], gpus: int = 1) -> list[Step]:
    python = sys.executable
    bench = [python, "-m", "pytest_hotswap.bench", "--device", "cuda", "--samples", str(SAMPLES)]
    conformance = [
        python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "pytest_hotswap.conformance",
        "--hotswap-device=cuda",
        "--hotswap-mode=reduce-overhead",
        f"--hotswap-report={out / REPORT}",
        f"--junitxml={out / JUNIT}",
    ]
    if capability >= (8, 9):
        conformance.append("--hotswap-quantize=float8-dynamic")
    conformance += xdist_args(gpus)
    return [
        Step(
            "bench-max-autotune-no-cudagraphs",
            [
                *bench,
                "--mode",
                "max-autotune-no-cudagraphs",
                "--only",
                ",".join(GPU_MEASUREMENTS),
                "--out",
                str(out / "bench-max-autotune-no-cudagraphs"),
            ],
        ),
        Step(
            "bench-reduce-overhead",
            [
                *bench,
                "--backends",
                "inductor",
                "--mode",
                "reduce-overhead",
                "--only",
                "recompile_stall,end_to_end",
                "--out",
                str(out / "bench-reduce-overhead"),
            ],
        ),
        Step("conformance", conformance),
    ]


def run(out: Path, budget_s: float = BUDGET_S) -> int:
    try:
        gpus = gpu()
    except NoGpuError as error:
        print(f"gpu-check: FAILED: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for stale in REPORT, JUNIT:  # an earlier run's, which per_device must not count
        (out / stale).unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    planned = steps(out, gpus.capability, gpus.count)
    deadline = time.monotonic() + budget_s
    workers = "one pytest-xdist worker per GPU" if gpus.count > 1 else "one process"
    print(f"gpu-check: {gpus.describe()}, conformance in {workers}, into {out}")
    for step in planned:
        left = min(deadline - time.monotonic(), BENCH_CAPS_S.get(step.name, budget_s))
        if left <= 0:
            step.status = "not run (budget spent)"
            continue
        print(f"gpu-check: {step.name}: {' '.join(step.command)}", flush=True)
        step.status, step.seconds = _run_step(step, out / f"{step.name}.log", env, left)
        print(f"gpu-check: {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
    devices = per_device(out / REPORT, out / JUNIT)
    for line in per_device_lines(devices):
        print(f"gpu-check: {line}")
    summary: dict[str, Any] = {
        "gpu": gpus.names[0],
        "gpus": list(gpus.names),
        "compute_capability": list(gpus.capability),
        "budget_s": budget_s,
        "steps": [dataclasses.asdict(step) for step in planned],
        "per_device": devices,
    }
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [step for step in planned if step.status != "passed"]
    if failed:
        print(
            "gpu-check: FAILED: "
            + "; ".join(
                f"{step.name} {step.status} (log: {out / step.name}.log)" for step in failed
            ),
            file=sys.stderr,
        )
        return 1
    print(f"gpu-check: passed; results under {out}")
    return 0


#: The device of records without one (reports older than ``--hotswap-devices``).
UNKNOWN_DEVICE = "unknown"


def per_device(report: Path, junit: Path) -> list[dict[str, Any]]:
    """The conformance step's tests and seconds per device: how many tests and how many seconds
    of compiling from the hotswap report's records (grouped by their ``device``), and the seconds
    the tests took (setup, call and teardown) from the JUnit XML's test cases, grouped by the same
    ``device`` property; ``test_s`` is ``None`` where there is no readable JUnit XML. Empty when
    there is no readable report (the step did not run, or was stopped before writing it)."""
    from pytest_hotswap.report import Report, ReportError

    try:
        records = Report.load(report).tests
    except ReportError:
        return []
    seconds = _junit_seconds(junit)
    totals: dict[str, dict[str, Any]] = {}
    for record in records:
        device = record.device or UNKNOWN_DEVICE
        entry = totals.setdefault(device, {"device": device, "tests": 0, "compile_s": 0.0})
        entry["tests"] += 1
        entry["compile_s"] += record.compile_s
    for device, entry in totals.items():
        entry["compile_s"] = round(entry["compile_s"], 2)
        entry["test_s"] = None if seconds is None else round(seconds.get(device, 0.0), 2)
    return [totals[device] for device in sorted(totals)]


def per_device_lines(devices: list[Mapping[str, Any]]) -> list[str]:
    """``per device: cuda:0: 12 tests, 84.3 s (31.0 s compiling)``, one line per device."""
    if not devices:
        return ["per device: none (no conformance report)"]
    lines = []
    for entry in devices:
        took = "? s (no JUnit XML)" if entry["test_s"] is None else f"{entry['test_s']:.1f} s"
        tests = f"{entry['tests']} test{'' if entry['tests'] == 1 else 's'}"
        lines.append(
            f"per device: {entry['device']}: {tests}, {took} ({entry['compile_s']:.1f} s compiling)"
        )
    return lines


def _junit_seconds(junit: Path) -> dict[str, float] | None:
    """Seconds per ``device`` property summed over the JUnit XML's test cases (those without the
    property, tests no watcher recorded, are left out); ``None`` when there is no readable file."""
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    seconds: dict[str, float] = {}
    for case in root.iter("testcase"):
        devices = [p.get("value") for p in case.iter("property") if p.get("name") == "device"]
        if devices and devices[0]:
            seconds[devices[0]] = seconds.get(devices[0], 0.0) + float(case.get("time", 0.0))
    return seconds


def _run_step(step: Step, log: Path, env: dict[str, str], timeout: float) -> tuple[str, float]:
    """Run one step in its own process group (inductor's compile workers included), so a step
    past the budget is stopped whole."""
    start = time.monotonic()
    with log.open("w") as output:
        process = subprocess.Popen(
            step.command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out: stopped at its limit of {timeout:.0f} s"
            return status, time.monotonic() - start
    status = "passed" if code == 0 else f"failed (exit {code})"
    return status, time.monotonic() - start
