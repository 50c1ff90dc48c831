"""The README's "in your repository" path, as a new user takes it: `make wheel-check`.

    python3 tools/wheel_check.py [--keep] [-- extra pytest arguments]

Builds the wheel (``pip wheel --no-deps``), creates a fresh virtualenv in a temporary folder
outside the repository, installs the wheel without extras plus the pinned stack
(``-c constraints.txt``, through ``tools/install.py``), and from another temporary folder runs

    python -m pytest --pyargs pytest_hotswap.conformance --hotswap-max-rank=128
        --hotswap-backend=eager -p no:cacheprovider -q

It fails unless the suite exits 0, the package is imported from the virtualenv (not from this
checkout: ``PYTHONPATH`` is dropped), torchao is not installed (no extras) and the matrix shows
the quantized base as "not supported" (an extra the user did not ask for is not a failure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = [
    "-m",
    "pytest",
    "--pyargs",
    "pytest_hotswap.conformance",
    "--hotswap-max-rank=128",
    "--hotswap-backend=eager",
    "-p",
    "no:cacheprovider",
    "-q",
]


def step(message: str, started: float) -> None:
    print(f"wheel-check [{time.monotonic() - started:6.1f} s] {message}", flush=True)


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def check(root: Path, extra: list[str]) -> int:
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")

    dist = root / "dist"
    step(f"building the wheel of {REPO}", started)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(REPO)])
    wheel = next(dist.glob("pytest_hotswap-*.whl"))

    venv = root / "venv"
    python = venv / "bin" / "python"
    step(f"a fresh virtualenv in {venv}; installing {wheel.name} without extras", started)
    run([sys.executable, "-m", "venv", str(venv)])
    install = [sys.executable, str(REPO / "tools" / "install.py"), str(python)]
    run([*install, "-c", str(REPO / "constraints.txt"), str(wheel)], env=env)

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import importlib.util, pytest_hotswap; print(pytest_hotswap.__file__); "
        "print(importlib.util.find_spec('torchao') is not None)"
    )
    where, torchao = run(
        [str(python), "-c", probe], cwd=elsewhere, env=env, capture_output=True
    ).stdout.split()
    if not Path(where).is_relative_to(venv):
        print(f"wheel-check: pytest_hotswap imported from {where}, not the virtualenv")
        return 1
    if torchao != "False":
        print("wheel-check: torchao is installed, but the wheel was installed without extras")
        return 1

    step(f"the conformance suite from {elsewhere}", started)
    suite = subprocess.run(
        [str(python), *SUITE, *extra],
        cwd=elsewhere,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    print(suite.stdout, end="")
    if suite.returncode != 0:
        print(f"wheel-check: the conformance suite exited {suite.returncode}")
        return 1
    quantized = [line for line in suite.stdout.splitlines() if line.startswith("quantized base")]
    if not quantized or "not supported" not in quantized[0] or "FAIL" in quantized[0]:
        print(f"wheel-check: the matrix's quantized-base row is {quantized}, not 'not supported'")
        return 1
    step("passed: exit 0, installed without extras, quantized base not supported", started)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("extra", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pytest-hotswap-wheel-check-")).resolve()
    if root.is_relative_to(REPO):
        print(f"wheel-check: the temporary folder {root} is inside the repository; set TMPDIR")
        return 1
    try:
        return check(root, args.extra)
    finally:
        if args.keep:
            print(f"wheel-check: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
