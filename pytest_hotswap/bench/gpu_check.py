"""``python -m pytest_hotswap.bench --gpu-check --out DIR``: one prepared check on one CUDA GPU.

On a machine with a CUDA GPU and no network it runs, each step in its own process, each writing
under ``DIR``:

1. the bench in GPU mode (bf16, inductor ``max-autotune-no-cudagraphs``, torchao float8-dynamic
   when the compute capability is >= 8.9), every measurement that touches the GPU:
   ``DIR/bench-max-autotune-no-cudagraphs/``;
2. the stall and end-to-end measurements again with inductor ``reduce-overhead`` (CUDA graphs):
   ``DIR/bench-reduce-overhead/``;
3. the conformance suite with ``--hotswap-device=cuda --hotswap-mode=reduce-overhead`` (plus
   ``--hotswap-quantize=float8-dynamic`` at compute capability >= 8.9): ``DIR/conformance.json``
   (its report) and ``DIR/conformance.xml`` (JUnit).

Every step's output goes to ``DIR/<step>.log``; ``DIR/gpu-check.json`` says what ran, how long,
and how it ended. The whole check has ``BUDGET_S`` (8 minutes on an H100-class GPU), each bench
step at most its ``BENCH_CAPS_S`` so the conformance suite keeps the rest; a step still running
at its limit is stopped (its process group killed) and fails the check. Exit status: 0 when
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


class NoGpuError(RuntimeError):
    """The check needs one CUDA GPU and found none."""


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    status: str = "not run"  # passed, failed (exit N), timed out, not run
    seconds: float = 0.0


def gpu() -> tuple[str, tuple[int, int]]:
    """The GPU's name and compute capability, or ``NoGpuError`` saying why there is none."""
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
    return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


def steps(out: Path, capability: tuple[int, int]) -> list[Step]:
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
        f"--hotswap-report={out / 'conformance.json'}",
        f"--junitxml={out / 'conformance.xml'}",
    ]
    if capability >= (8, 9):
        conformance.append("--hotswap-quantize=float8-dynamic")
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
        name, capability = gpu()
    except NoGpuError as error:
        print(f"gpu-check: FAILED: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    planned = steps(out, capability)
    deadline = time.monotonic() + budget_s
    print(f"gpu-check: {name}, compute capability {capability[0]}.{capability[1]}, into {out}")
    for step in planned:
        left = min(deadline - time.monotonic(), BENCH_CAPS_S.get(step.name, budget_s))
        if left <= 0:
            step.status = "not run (budget spent)"
            continue
        print(f"gpu-check: {step.name}: {' '.join(step.command)}", flush=True)
        step.status, step.seconds = _run_step(step, out / f"{step.name}.log", env, left)
        print(f"gpu-check: {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
    summary: dict[str, Any] = {
        "gpu": name,
        "compute_capability": list(capability),
        "budget_s": budget_s,
        "steps": [dataclasses.asdict(step) for step in planned],
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
