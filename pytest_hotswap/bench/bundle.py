"""The GPU bundle: what a GPU machine without network needs beside its own torch, as wheels.

The GPU machines lent to this project have no network. Their image holds Python 3.12, a CUDA
torch (2.11.0+cu130), transformers, PEFT, safetensors, pytest and pytest-xdist, but no diffusers
and no torchao. At most 64 MiB travels with the working tree, so the bundle holds the project's
own wheel and the few wheels the image lacks, never torch::

    python -m pytest_hotswap.bench.bundle build --out gpu-bundle            # here, with network
    python -m pytest_hotswap.bench.bundle install --bundle gpu-bundle --target DIR   # there
    PYTHONPATH=DIR PYTHONSAFEPATH=1 python -m pytest_hotswap.bench.bundle verify \\
        --bundle gpu-bundle --target DIR --out RESULTS                      # there, before the check

``build`` downloads exactly :data:`BUNDLED` (``pip download --no-deps --only-binary=:all:`` for
CPython 3.12 manylinux x86-64) plus ``pip wheel --no-deps .``, and writes ``manifest.json``: each
wheel's name, version, file, sha256, size and top-level modules, and :data:`FROM_MACHINE`, what
the machine must already hold. ``install`` is ``pip install --no-index --no-deps --target`` (it
never reaches a network). ``verify`` imports every bundled module and checks that it comes from
the target folder at the manifest's version, and that the machine's own packages satisfy
:data:`FROM_MACHINE`; it writes ``RESULTS/bundle.json`` and exits 1 on any mismatch.

Only the standard library (and ``packaging``, when there) is used: ``install`` runs before
anything of the bundle is importable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

#: The largest bundle that travels with the working tree (the device tool's limit per call).
MAX_BYTES = 64 * 1024 * 1024
#: What the GPU image lacks, at the versions CI runs (``constraints.txt``), each named with its
#: reason. PEFT is on the image at an unknown version; the known-defect ranges are verified on
#: peft <= 0.21.2, so the bundle carries that one.
BUNDLED: dict[str, tuple[str, str]] = {
    "diffusers": ("0.42.1", "not on the image"),
    "torchao": ("0.18.0", "not on the image; float8-dynamic and the quantized scenarios"),
    "peft": ("0.21.2", "the image's version is unknown; the known defects are verified on it"),
    "importlib_metadata": ("10.2.0", "diffusers needs it; not on the image"),
    "lazy-importer": ("0.1.0", "importlib_metadata 10 needs it"),
    "zipp": ("4.1.2", "importlib_metadata 10 needs zipp>=3.20; the image's version is unknown"),
}
#: What the machine must already hold (never bundled: torch is several GB as a CUDA build), as
#: the bundled wheels and the plugin declare it. ``verify`` checks each.
FROM_MACHINE: dict[str, str] = {
    "torch": ">=2.11",
    "transformers": ">=5.0",
    "huggingface-hub": ">=1.32,<3.0",  # diffusers 0.42.1
    "safetensors": ">=0.8.0",  # diffusers 0.42.1
    "pytest": ">=8.0",
    "pluggy": ">=1.5",
    "packaging": ">=22",
    "accelerate": ">=0.21.0",  # peft 0.21.2
    "numpy": "",
    "pillow": "",
    "regex": "",
    "requests": "",
    "filelock": "",
    "pyyaml": "",
    "psutil": "",
    "tqdm": "",
    "matplotlib": "",  # the bench's plot
}
PYTHON_VERSION = "3.12"
#: pip matches each manylinux tag exactly, so every one a wheel here may carry is named.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
PROJECT = "pytest-hotswap"
ROOT = Path(__file__).resolve().parents[2]


class BundleError(RuntimeError):
    """The bundle cannot be built, installed or trusted; the message says what to do."""


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _wheel_info(wheel: Path) -> dict[str, Any]:
    """Name, version and top-level modules from a wheel's ``METADATA`` and file list."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta_path = next(
            n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        )
        headers = archive.read(meta_path).decode()
    fields = dict(
        line.split(": ", 1) for line in headers.splitlines() if ": " in line and line[0] != " "
    )
    modules = set()
    for name in names:
        top = name.split("/", 1)[0]
        if top.endswith((".dist-info", ".data")) or top.endswith(".pth"):
            continue
        if "/" in name:
            modules.add(top)
        elif top.endswith(".py"):
            modules.add(top[: -len(".py")])
    return {"name": fields["Name"], "version": fields["Version"], "modules": sorted(modules)}


def _pip(python: str, *args: str) -> None:
    # The machine's pip constraints (a cap on torch, say) are for its own venvs, not for this.
    env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([python, "-m", "pip", *args], check=True, env=env)


def build(out: Path, python: str = sys.executable, project: Path = ROOT) -> dict[str, Any]:
    """Write the bundle into ``out`` (emptied first) and return its manifest."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        _pip(python, "wheel", "--quiet", "--no-deps", "--wheel-dir", scratch, str(project))
        for wheel in Path(scratch).glob("*.whl"):
            shutil.move(str(wheel), out / wheel.name)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    _pip(
        python,
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        *platforms,
        "--dest",
        str(out),
        *(f"{name}=={version}" for name, (version, _) in BUNDLED.items()),
    )
    manifest = manifest_of(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _why(name: str) -> str:
    if _normalize(name) == PROJECT:
        return "this project"
    reasons = {_normalize(bundled): why for bundled, (_, why) in BUNDLED.items()}
    return reasons.get(_normalize(name), "not in BUNDLED: remove it from the folder")


def manifest_of(folder: Path) -> dict[str, Any]:
    """The manifest of the wheels in ``folder``: one of each, never torch, at most 64 MiB."""
    packages = []
    for wheel in sorted(folder.glob("*.whl")):
        info = _wheel_info(wheel)
        data = wheel.read_bytes()
        packages.append(
            {
                **info,
                "wheel": wheel.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "why": _why(info["name"]),
            }
        )
    names = [_normalize(p["name"]) for p in packages]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise BundleError(f"{folder} holds two versions of {', '.join(doubles)}: keep one of each")
    if "torch" in names:
        raise BundleError(f"{folder} holds torch: the machine's own CUDA torch must be used")
    total = sum(p["bytes"] for p in packages)
    if total > MAX_BYTES:
        raise BundleError(
            f"{folder} holds {total / 2**20:.1f} MiB of wheels, more than the "
            f"{MAX_BYTES // 2**20} MiB that travel: bundle fewer packages"
        )
    return {
        "python": PYTHON_VERSION,
        "platforms": list(PLATFORMS),
        "bytes": total,
        "packages": packages,
        "from_machine": FROM_MACHINE,
    }


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(
            f"{path} is missing: build the bundle with `make gpu-bundle` on a machine with network "
            "and carry the folder along"
        )
    manifest = json.loads(path.read_text())
    for package in manifest["packages"]:
        wheel = bundle / package["wheel"]
        if not wheel.is_file():
            raise BundleError(f"{wheel} is in the manifest but not in the bundle: rebuild it")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != package["sha256"]:
            raise BundleError(f"{wheel} does not match the manifest's sha256: rebuild the bundle")
    return manifest


def install(bundle: Path, target: Path, python: str = sys.executable) -> None:
    """``pip install --no-index --no-deps --target`` of every wheel in the manifest (``target``
    is emptied first), so nothing is fetched and the machine's own packages stay as they are."""
    manifest = read_manifest(bundle)
    if target.exists():
        shutil.rmtree(target)
    _pip(
        python,
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--target",
        str(target),
        *(str(bundle / package["wheel"]) for package in manifest["packages"]),
    )


def _under(path: str | os.PathLike[str] | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def verify(bundle: Path, target: Path) -> dict[str, Any]:
    """What this interpreter imports, against the manifest: each bundled package from ``target``
    at the manifest's version, each of :data:`FROM_MACHINE` installed in its range."""
    import importlib

    manifest = read_manifest(bundle)
    problems: list[str] = []
    bundled = []
    for package in manifest["packages"]:
        name, wanted = package["name"], package["version"]
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed; install the bundle into {target} first")
            continue
        where = str(dist.locate_file(""))
        found = {"name": name, "version": dist.version, "location": where, "modules": {}}
        if dist.version != wanted:
            problems.append(f"{name}: the manifest says {wanted}, {dist.version} is found")
        if not _under(where, target):
            problems.append(
                f"{name}: found in {where}, not in {target}: put {target} first on PYTHONPATH "
                "(and PYTHONSAFEPATH=1, so the working directory does not shadow it)"
            )
        for module in package["modules"]:
            try:
                loaded = importlib.import_module(module)
            except Exception as error:  # an import that fails is a finding, not a crash
                problems.append(f"{name}: import {module} failed: {type(error).__name__}: {error}")
                continue
            origin = getattr(loaded, "__file__", None)
            found["modules"][module] = origin
            if not _under(origin, target):
                problems.append(f"{name}: {module} is imported from {origin}, not from {target}")
        bundled.append(found)
    machine = {}
    for name, specifier in manifest["from_machine"].items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}{specifier}: not installed on this machine (it is not bundled)")
            continue
        machine[name] = version
        if specifier and not _satisfies(version, specifier):
            problems.append(f"{name} {version} is installed; the bundle needs {name}{specifier}")
    return {"ok": not problems, "problems": problems, "bundled": bundled, "machine": machine}


def _satisfies(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return Version(Version(version).base_version) in SpecifierSet(specifier)


def _bundle_env(target: Path) -> dict[str, str]:
    """The environment in which the bundle is what gets imported: ``target`` first on
    ``PYTHONPATH``, and ``PYTHONSAFEPATH=1`` so that ``python -m`` run from a checkout does not
    import the checkout's own ``pytest_hotswap`` instead of the bundled wheel."""
    path = os.pathsep.join(p for p in (str(target.resolve()), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1"}


def check(bundle: Path, target: Path, out: Path, *, dry: bool = False) -> int:
    """Install the bundle, verify it, then run ``--gpu-check`` into ``out`` on this machine's
    own Python and torch (the exit status is the check's: 2 without a GPU). ``dry``: the steps
    that need no GPU instead (:data:`DRY_STEPS`), for a machine without one."""
    install(bundle, target)
    env = _bundle_env(target)
    python = sys.executable
    here = [python, "-m", "pytest_hotswap.bench.bundle"]
    verified = subprocess.run(
        [*here, "verify", "--bundle", str(bundle), "--target", str(target), "--out", str(out)],
        env=env,
        check=False,
    )
    if verified.returncode != 0:
        return 1
    if not dry:
        return subprocess.run(
            [python, "-m", "pytest_hotswap.bench", "--gpu-check", "--out", str(out)],
            env=env,
            check=False,
        ).returncode
    return _dry(python, env, out)


#: The dry run's steps: (name, command after ``python -m``, the exit status it must give, a
#: line its output must hold). The conformance options are the GPU check's own (collected only),
#: for one GPU and for two (one pytest-xdist worker per GPU: the options must be accepted).
DRY_STEPS: tuple[tuple[str, list[str], int, str], ...] = (
    (
        "no-gpu",
        ["pytest_hotswap.bench", "--gpu-check", "--out", "{out}/no-gpu"],
        2,
        "gpu-check: FAILED: gpu-check needs a CUDA GPU",
    ),
    ("collect-gpu-conformance", ["{conformance}", "--collect-only"], 0, " tests collected in "),
    (
        "collect-gpu-conformance-2-gpus",
        ["{conformance-2-gpus}", "--collect-only"],
        0,
        " tests collected in ",
    ),
    (
        "eager-conformance",
        [
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "pytest_hotswap.conformance",
            "--hotswap-backend=eager",
            "--hotswap-pipelines=flux",
            "-k",
            "same_rank or rank_over_max or quantized_base",
            "--hotswap-report={out}/eager-conformance.json",
        ],
        0,
        "hotswap isolation: ",
    ),
)


def dry_commands(python: str, out: Path) -> list[tuple[str, list[str], int, str]]:
    """:data:`DRY_STEPS` as command lines for ``python``, writing under ``out``."""
    from pytest_hotswap.bench import gpu_check

    conformance = {
        "{conformance}": gpu_check.steps(out / "collect", (9, 0))[-1].command[2:],
        "{conformance-2-gpus}": gpu_check.steps(out / "collect", (9, 0), 2)[-1].command[2:],
    }
    commands = []
    for name, command, code, expected in DRY_STEPS:
        args = [python, "-m"]
        for arg in command:
            args += conformance[arg] if arg in conformance else [arg.format(out=out)]
        commands.append((name, args, code, expected))
    return commands


def _dry(python: str, env: dict[str, str], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, args, code, expected in dry_commands(python, out):
        log = out / f"{name}.log"
        print(f"gpu-check-dry: {name}: {' '.join(args)}", flush=True)
        with log.open("w") as output:
            found = subprocess.run(
                args, stdout=output, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        text = log.read_text()
        if found != code or expected not in text:
            failed.append(f"{name} exited {found} (wants {code} and {expected!r}; log: {log})")
        print(f"gpu-check-dry: {name}: exit {found}", flush=True)
        for line in text.splitlines():
            if line.startswith(("hotswap isolation:", "gpu-check: FAILED")):
                print(f"    {line}")
    if failed:
        print("gpu-check-dry: FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print(f"gpu-check-dry: passed; logs under {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_hotswap.bench.bundle")
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="download the wheels and write manifest.json")
    build_cmd.add_argument("--out", type=Path, default=Path("gpu-bundle"))
    install_cmd = commands.add_parser("install", help="pip install --no-index --target")
    verify_cmd = commands.add_parser("verify", help="check what is imported against the manifest")
    for command in (install_cmd, verify_cmd):
        command.add_argument("--bundle", type=Path, default=Path("gpu-bundle"))
        command.add_argument("--target", type=Path, required=True)
    verify_cmd.add_argument("--out", type=Path, help="write bundle.json here")
    check_cmd = commands.add_parser("check", help="install, verify, then run --gpu-check")
    check_cmd.add_argument("--bundle", type=Path, default=Path("gpu-bundle"))
    check_cmd.add_argument("--target", type=Path, required=True)
    check_cmd.add_argument("--out", type=Path, required=True)
    check_cmd.add_argument("--dry", action="store_true", help="the steps that need no GPU")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            manifest = build(args.out)
            for package in manifest["packages"]:
                print(f"bundle: {package['wheel']} ({package['bytes'] / 2**20:.1f} MiB)")
            print(f"bundle: {manifest['bytes'] / 2**20:.1f} MiB in {args.out}")
        elif args.command == "check":
            return check(args.bundle, args.target, args.out, dry=args.dry)
        elif args.command == "install":
            install(args.bundle, args.target)
            print(f"bundle: installed {args.bundle} into {args.target}")
        else:
            found = verify(args.bundle, args.target)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "bundle.json").write_text(json.dumps(found, indent=2) + "\n")
            if not found["ok"]:
                print("bundle: FAILED: " + "; ".join(found["problems"]), file=sys.stderr)
                return 1
            versions = ", ".join(f"{p['name']} {p['version']}" for p in found["bundled"])
            print(f"bundle: verified {versions}; torch {found['machine'].get('torch')}")
    except (BundleError, subprocess.CalledProcessError) as error:
        print(f"bundle: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
