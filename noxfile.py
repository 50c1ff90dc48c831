"""The conformance suite on several dependency stacks, each in its own virtual environment.

    nox -s oldest pinned newest combine      # what `make stacks` would run
    nox -s newest -- -k same_rank            # extra pytest arguments go after `--`
    TORCH=2.14.1 nox -s newest               # a torch axis: other builds here are multi-GB CUDA wheels

Every stack installs torch==$TORCH (default 2.13.0, the only CPU wheel on this machine's disk) as a
requirement and a constraint, so no resolver can swap in another torch build. Each session writes
reports/stacks/<stack>.json (<stack>-torch<version>.json with another torch; the plugin's
--hotswap-report, with the stack's versions); `combine` prints one table of every report there,
stack by scenario, and the cells that differ (`pytest-hotswap stacks`): run once by default and
once with TORCH=2.14.1 and it shows what changes with torch as well.

uv is the virtualenv backend when installed (venvs + installs in seconds instead of ~100 s with pip);
it does not read pip's configuration, so pip's find-links / extra-index-url are passed to it and
--index-strategy unsafe-best-match gives pip's "best version over all indexes" behaviour.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent / "tools"))
from install import uv_flags  # tools/ is not a package: put on sys.path above

ROOT = Path(__file__).parent
REPORTS = ROOT / "reports" / "stacks"
DEFAULT_TORCH = "2.13.0"
TORCH = os.environ.get("TORCH", DEFAULT_TORCH)

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["oldest", "pinned", "newest", "combine"]

#: The options every stack runs with, so that a cell differs between stacks only when the stack
#: does: eager (dynamo's guards decide recompiles the same way for every backend; `make
#: conformance` covers inductor) and the product's max rank. Extra pytest arguments after `--`
#: (`make stacks ARGS="-- ..."`) apply to every stack alike.
# The same options on every stack (eager: dynamo's guards decide recompiles the same way for every
# backend), one xdist worker per core with each column on one worker, as `make conformance`.
OPTIONS = ["--hotswap-backend=eager", "--hotswap-max-rank=128", "-n", "auto", "--dist", "loadgroup"]

#: name -> (requirements, use constraints.txt). The oldest stack is the oldest set on which the
#: fixtures, the marker and the reference work and the suite passes, on torch 2.13.0 with
#: HF_HUB_OFFLINE=1 (docs: "Verified stacks" says what breaks below each bound).
STACKS: dict[str, tuple[list[str], bool]] = {
    "oldest": (
        ["diffusers==0.40.0", "peft==0.20.0", "transformers==5.0.0", "torchao==0.16.0"],
        False,
    ),
    "pinned": ([], True),
    "newest": (["diffusers", "peft", "transformers", "torchao"], False),
}

ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "inductor"),
}


def _constraints(session: nox.Session, pinned: bool) -> Path:
    """torch==$TORCH, plus constraints.txt (its torch line replaced) for the pinned stack."""
    lines = [f"torch=={TORCH}"]
    if pinned:
        lines += [
            line
            for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#") and not line.lower().startswith("torch==")
        ]
    path = Path(session.create_tmp()) / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_stack(session: nox.Session, name: str) -> None:
    requirements, pinned = STACKS[name]
    flags = uv_flags() if session.venv_backend == "uv" else []
    upgrade = ["--upgrade"] if name == "newest" else []
    session.install(
        *flags,
        *upgrade,
        "-c",
        str(_constraints(session, pinned)),
        "-e",
        ".[quant]",
        "pytest",
        "pytest-xdist",
        f"torch=={TORCH}",
        *requirements,
    )
    REPORTS.mkdir(parents=True, exist_ok=True)
    session.run(
        "python",
        "-m",
        "pytest",
        "--pyargs",
        "pytest_hotswap.conformance",
        "-p",
        "no:cacheprovider",
        "-q",
        *OPTIONS,
        f"--hotswap-report={_report(name)}",
        *session.posargs,
        env=ENV,
    )


def _make_session(name: str):
    def session_func(session: nox.Session) -> None:
        _run_stack(session, name)

    session_func.__doc__ = (
        f"Conformance suite on the {name} stack: {STACKS[name][0] or 'constraints.txt'}"
    )
    return nox.session(name=name)(session_func)


for _name in STACKS:
    globals()[f"stack_{_name}"] = _make_session(_name)


def _report(name: str) -> Path:
    """reports/stacks/<stack>.json; with another torch, <stack>-torch<version>.json beside it, so
    the table shows what changes with torch too."""
    suffix = "" if TORCH == DEFAULT_TORCH else f"-torch{TORCH}"
    return REPORTS / f"{name}{suffix}.json"


@nox.session(venv_backend="none")
def combine(session: nox.Session) -> None:
    """One table from reports/stacks/*.json: stack by scenario, then the cells that differ."""
    order = {name: index for index, name in enumerate(STACKS)}
    reports = sorted(
        REPORTS.glob("*.json"),
        key=lambda path: (order.get(path.stem.split("-torch")[0], len(order)), path.stem),
    )
    if not reports:
        session.error(f"no reports in {REPORTS}; run the stack sessions first")
    session.run(
        sys.executable, "-m", "pytest_hotswap.cli", "stacks", *map(str, reports), external=True
    )
