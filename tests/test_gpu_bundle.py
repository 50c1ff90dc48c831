"""The GPU bundle (``make gpu-bundle``, ``make gpu-check NO_VENV=1``) and the isolation route on
a torch without ``isolate_recompiles``.

The bundle tests build small wheels by hand (no network, no pip download); ``make gpu-check-dry``
runs the real bundle on torch 2.11.0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from pytest_hotswap.bench import bundle
from pytest_hotswap.watch import isolation

ROOT = Path(__file__).resolve().parents[1]
#: No index, no find-links, and every proxy a closed port: any fetch fails at once.
OFFLINE = {
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
}


def _wheel(folder: Path, name: str, version: str, *, size: int = 0) -> Path:
    """A pure-Python wheel holding one module ``<name>`` with ``VERSION`` and ``size`` bytes of
    stored padding, written the way pip expects (METADATA, WHEEL, RECORD)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{name}/pad.bin": "x" * size,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def tiny_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bundle of one hand-made wheel, needing nothing from the machine but what this venv has."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    _wheel(folder, "hotswap_probe", "1.2.3")
    monkeypatch.setattr(bundle, "FROM_MACHINE", {"torch": ">=2.11", "pytest": ">=8.0"})
    (folder / "manifest.json").write_text(json.dumps(bundle.manifest_of(folder)))
    return folder


def test_the_bundle_carries_the_versions_ci_runs_and_never_torch() -> None:
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[bundle._normalize(name)] = version
    assert {name: version for name, (version, _) in bundle.BUNDLED.items()} == {
        "diffusers": "0.42.1",
        "torchao": "0.18.0",
        "peft": "0.21.2",
        "importlib_metadata": "10.2.0",
        "lazy-importer": "0.1.0",
        "zipp": "4.1.2",
    }
    for name, (version, _) in bundle.BUNDLED.items():
        assert pinned[bundle._normalize(name)] == version, name
    assert "torch" not in bundle.BUNDLED
    assert bundle.FROM_MACHINE["torch"] == ">=2.11"
    assert bundle.MAX_BYTES == 64 * 2**20


def test_the_manifest_names_each_wheel_and_refuses_torch_doubles_and_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _wheel(tmp_path, "diffusers", "0.42.1", size=1000)
    manifest = bundle.manifest_of(tmp_path)
    (package,) = manifest["packages"]
    assert (package["name"], package["version"], package["modules"]) == (
        "diffusers",
        "0.42.1",
        ["diffusers"],
    )
    assert package["wheel"] == "diffusers-0.42.1-py3-none-any.whl"
    assert package["why"] == "not on the image"
    assert manifest["bytes"] == package["bytes"] == (tmp_path / package["wheel"]).stat().st_size
    assert manifest["python"] == "3.12"

    monkeypatch.setattr(bundle, "MAX_BYTES", 1000)  # the wheel holds 1000 bytes of padding
    with pytest.raises(bundle.BundleError, match=r"MiB of wheels, more than the 0 MiB"):
        bundle.manifest_of(tmp_path)
    monkeypatch.undo()
    _wheel(tmp_path, "diffusers", "0.41.0")
    with pytest.raises(bundle.BundleError, match="two versions of diffusers: keep one of each"):
        bundle.manifest_of(tmp_path)
    (tmp_path / "diffusers-0.41.0-py3-none-any.whl").unlink()
    _wheel(tmp_path, "torch", "2.11.0")
    with pytest.raises(bundle.BundleError, match="holds torch"):
        bundle.manifest_of(tmp_path)


def _verify(tiny_bundle: Path, target: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest_hotswap.bench.bundle", "verify"),
            *("--bundle", str(tiny_bundle), "--target", str(target)),
            *("--out", str(target.parent / "out")),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=target.parent,
    )


def test_install_needs_no_network_and_verify_reads_what_is_imported(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    target = tmp_path / "site"
    bundle.install(tiny_bundle, target)
    assert (target / "hotswap_probe" / "__init__.py").read_text() == "VERSION = '1.2.3'\n"

    found = _verify(tiny_bundle, target, bundle._bundle_env(target))
    assert found.returncode == 0, found.stderr
    assert "bundle: verified hotswap_probe 1.2.3; torch " in found.stdout
    report = json.loads((tmp_path / "out" / "bundle.json").read_text())
    assert report["bundled"][0]["modules"] == {
        "hotswap_probe": str(target.resolve() / "hotswap_probe" / "__init__.py")
    }

    # Negative controls: the bundle not on the path, then a manifest that says another version.
    found = _verify(tiny_bundle, target, {**os.environ, "PYTHONSAFEPATH": "1"})
    assert found.returncode == 1
    assert "hotswap_probe: not installed; install the bundle into" in found.stderr
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["packages"][0]["version"] = "9.9.9"
    (tiny_bundle / "manifest.json").write_text(json.dumps(manifest))
    found = _verify(tiny_bundle, target, bundle._bundle_env(target))
    assert found.returncode == 1
    assert "hotswap_probe: the manifest says 9.9.9, 1.2.3 is found" in found.stderr


def test_a_wheel_that_does_not_match_the_manifest_is_refused(tiny_bundle: Path) -> None:
    _wheel(tiny_bundle, "hotswap_probe", "1.2.3", size=10)  # rewritten after the manifest
    with pytest.raises(bundle.BundleError, match="does not match the manifest's sha256"):
        bundle.install(tiny_bundle, tiny_bundle.parent / "site")
    with pytest.raises(bundle.BundleError, match=r"manifest.json is missing: build the bundle"):
        bundle.read_manifest(tiny_bundle.parent)


@pytest.mark.xdist_group("make")
def test_make_gpu_check_in_the_bundle_layout_exits_2_without_a_gpu(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The machine's own python (NO_VENV), the bundle installed beside it, no GPU visible."""
    out = tmp_path / "gpu"
    env = {**os.environ, **OFFLINE, "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    found = subprocess.run(
        [
            *("make", "--no-print-directory", "gpu-check", "NO_VENV=1", f"PYTHON={sys.executable}"),
            *(f"GPU_BUNDLE={tiny_bundle}", f"GPU_SITE={tmp_path / 'site'}", f"GPU_OUT={out}"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 2  # make's own status for a failed recipe: the next line says whose
    assert "gpu-check] Error 2" in found.stderr
    assert "gpu-check: FAILED: gpu-check needs a CUDA GPU" in found.stderr
    assert "bundle: verified hotswap_probe 1.2.3" in found.stdout
    assert json.loads((out / "bundle.json").read_text())["ok"] is True
    assert not (out / "gpu-check.json").exists()  # nothing ran


# --- torch without isolate_recompiles: the reset route -----------------------------------------


@pytest.fixture
def torch_2_11_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` as torch 2.11 and 2.12 spell it: no ``isolate_recompiles``."""
    real = getattr(torch.compile, isolation._ORIGINAL, torch.compile)

    def compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None,
                options=None, disable=False):  # fmt: skip
        return real(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode,
                    options=options, disable=disable)  # fmt: skip

    monkeypatch.setattr(torch, "compile", compile)


def test_the_route_follows_the_signature(torch_2_11_signature) -> None:
    assert isolation.route() == isolation.RESET
    assert isolation.isolate_compiles()() is None  # nothing patched, nothing to undo
    assert not isolation.is_isolating()
    assert isolation.describe_route(isolation.RESET) == (
        f"torch.compiler.reset() before each watched test (torch {torch.__version__} has no "
        "isolate_recompiles; models compiled within one test share entries)"
    )


def test_the_route_of_the_installed_torch() -> None:
    """Negative control of the one above: read from the version, not from the signature."""
    real = Version(Version(torch.__version__).base_version) >= Version("2.13")
    assert isolation.route() == (isolation.ISOLATE if real else isolation.RESET)


SHARED = """
import pytest
import torch

X = torch.ones(2, 4)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(scope="module")
def shared():
    net = Net()
    return net, torch.compile(net, backend="eager", fullgraph=True)


@pytest.mark.no_recompile(count_all=True)
def test_d_grows(shared, compile_watcher):
    net, model = shared
    net.lin = torch.nn.Linear(4, 4)
    model(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    model(X)


@pytest.mark.no_recompile
def test_f_grows_again(shared, compile_watcher):
    net, model = shared
    net.lin = torch.nn.Linear(4, 4)
    model(X)
    compile_watcher.step("swap to width 6")
    net.lin = torch.nn.Linear(4, 6)
    model(X)
"""


#: torch 2.11's ``torch.compile`` signature in the run's own process (a conftest, so it is in
#: place before the plugin chooses its route).
OLD_SIGNATURE = """
import torch

_real = torch.compile


def compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None,
            options=None, disable=False):
    return _real(model, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode,
                 options=options, disable=disable)


torch.compile = compile
"""


@pytest.mark.slow
def test_without_isolate_recompiles_each_watched_test_starts_from_a_reset(
    pytester: pytest.Pytester,
) -> None:
    """test_f meets the width-6 entry test_d compiled: with isolate_recompiles a cache switch,
    through the reset route the plain recompile it is in a fresh process; the header says so."""
    pytester.makeconftest(OLD_SIGNATURE)
    pytester.makepyfile(test_shared=SHARED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hotswap-backend=eager")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "hotswap isolation: torch.compiler.reset() before each watched test (torch * has no "
            "isolate_recompiles; models compiled within one test share entries)",
            "*_ test_f_grows_again _*",
            "no_recompile: 1 recompile (none allowed)",
        ]
    )
    assert "cache switch" not in result.stdout.str()


@pytest.mark.skipif(not isolation.supported(), reason="this torch has no isolate_recompiles")
def test_with_isolate_recompiles_the_same_run_reads_a_cache_switch(
    pytester: pytest.Pytester,
) -> None:
    """Negative control of the test above, on the torch that has ``isolate_recompiles``."""
    pytester.makepyfile(test_shared=SHARED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--hotswap-backend=eager")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["hotswap isolation: isolate_recompiles=True on every torch.compile call (torch *)"]
    )
    assert "cache switch" in result.stdout.str()
