"""Beyond one process: one GPU per pytest-xdist worker, and where torch's compile caches live.

No pytest and no torch here: the GPUs are counted with ``nvidia-smi -L`` (NVML, in a child
process), so the controller never initialises CUDA and a worker can still be pinned with
``CUDA_VISIBLE_DEVICES`` before it does. The compile caches are torch's own (a local directory,
or its Redis remote caches for FX graphs and AOTAutograd); this module only says which
environment selects them, checks that a Redis answers, starts a private one on a free port (for the
plugin's tests and the bench's scaling table), and reads torch's hit and miss counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

#: Testing hook, private: a number of GPUs to pretend this host has (instead of ``nvidia-smi``).
#: The plugin's own tests use it to check the pinning on a host without a GPU.
FAKE_GPUS_ENV = "PYTEST_HOTSWAP_FAKE_GPUS"
CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
CPU = "cpu"
REDIS_PREFIX = "redis://"
#: The Debian package's binary that :func:`local_redis` starts.
REDIS_SERVER = "redis-server"
#: torch's counters the summary and the report give: (counters group, name).
CACHE_COUNTERS = (
    ("inductor", "fxgraph_cache_hit"),
    ("inductor", "fxgraph_cache_miss"),
    ("inductor", "fxgraph_cache_bypass"),
    ("aot_autograd", "autograd_cache_hit"),
    ("aot_autograd", "autograd_cache_miss"),
    ("aot_autograd", "autograd_cache_bypass"),
)


class ScaleError(ValueError):
    """A device list this host cannot give, or a compile cache that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Device:
    """One GPU of the plan: ``label`` as this process names it (``cuda:I``), ``entry`` what a
    worker's ``CUDA_VISIBLE_DEVICES`` is set to (an index or a UUID, as the parent allows it)."""

    label: str
    entry: str


# --- devices ----------------------------------------------------------------------------------


def gpu_count(env: Mapping[str, str] = os.environ) -> int:
    """GPUs on this host, from ``nvidia-smi -L`` (0 without it), without initialising CUDA."""
    fake = env.get(FAKE_GPUS_ENV)
    if fake is not None:
        return int(fake)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return len(re.findall(r"^GPU \d+:", listing, flags=re.MULTILINE))


def visible_gpus(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of the GPUs this process may use, in CUDA's order.

    Without the variable: every GPU. With it: its entries up to the first one CUDA would stop at
    (an index past the last GPU, a negative one, or an empty list means none).
    """
    count = gpu_count(env)
    allowed = env.get(CUDA_VISIBLE)
    if allowed is None:
        return tuple(str(index) for index in range(count))
    visible: list[str] = []
    for entry in (piece.strip() for piece in allowed.split(",")):
        known = int(entry) < count if entry.isdigit() else entry.startswith(("GPU-", "MIG-"))
        if not (known and count):
            break
        visible.append(entry)
    return tuple(visible)


def plan_devices(
    spec: str | int | tuple[int, ...], visible: Sequence[str], *, allowed: str | None = None
) -> tuple[Device, ...]:
    """The GPUs the run uses (empty: the CPU), from ``--hotswap-devices`` and the visible ones.

    ``cuda:I`` indexes the visible GPUs, as torch would number them in this process.
    """
    where = f" (CUDA_VISIBLE_DEVICES={allowed})" if allowed is not None else ""
    shown = f"this host shows {len(visible)} GPU{'' if len(visible) == 1 else 's'}{where}"
    if spec == "auto":
        indices: Sequence[int] = range(len(visible))
    elif isinstance(spec, int):
        if spec > len(visible):
            raise ScaleError(f"asks for {spec} GPUs but {shown}: give at most {len(visible)}")
        indices = range(spec)
    else:
        if not visible:
            raise ScaleError(
                f"lists CUDA devices but {shown}: use auto (the CPU here) or run on a GPU host"
            )
        missing = [f"cuda:{index}" for index in spec if index >= len(visible)]
        if missing:
            raise ScaleError(f"{', '.join(missing)}: {shown}, cuda:0 to cuda:{len(visible) - 1}")
        indices = spec
    return tuple(Device(f"cuda:{index}", visible[index]) for index in indices)


def worker_index(worker_id: str) -> int:
    """pytest-xdist's worker number: ``gw3`` -> 3."""
    digits = worker_id.lstrip("gw")
    return int(digits) if digits.isdigit() else 0


def device_for_worker(plan: Sequence[Device], worker_id: str | None) -> Device | None:
    """Worker K gets device K mod N; the controller (no worker id) the first; ``None``: the CPU."""
    if not plan:
        return None
    return plan[worker_index(worker_id) % len(plan)] if worker_id else plan[0]


def cuda_initialized() -> bool:
    """Whether CUDA already started in this process (then it can no longer be pinned)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return bool(cuda is not None and cuda.is_initialized())


# --- compile caches ---------------------------------------------------------------------------


def is_redis(location: str) -> bool:
    return location.startswith(REDIS_PREFIX)


def redis_address(location: str) -> tuple[str, int]:
    host, _, port = location[len(REDIS_PREFIX) :].rpartition(":")
    return host, int(port)


def cache_env(location: str, base: Path) -> dict[str, str | None]:
    """The environment that points torch's compile caches at ``location`` (``None``: unset).

    A directory is relative to ``base``. Redis keeps each process's local cache as it is and adds
    torch's remote FX graph and AOTAutograd caches on top.
    """
    if not is_redis(location):
        return {"TORCHINDUCTOR_CACHE_DIR": str((base / location).resolve())}
    host, port = redis_address(location)
    return {
        "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE": "1",
        "TORCHINDUCTOR_REDIS_HOST": host,
        "TORCHINDUCTOR_REDIS_PORT": str(port),
        "TORCHINDUCTOR_REDIS_URL": None,  # it would win over host and port
    }


def switch_loaded_configs() -> None:
    """Turn torch's remote caches on in configs already imported (a conftest imported torch):
    they read their variables once, at import."""
    inductor = sys.modules.get("torch._inductor.config")
    functorch = sys.modules.get("torch._functorch.config")
    if inductor is not None:
        inductor.fx_graph_remote_cache = True
    if functorch is not None:
        functorch.enable_remote_autograd_cache = True


def check_redis(location: str, timeout: float = 2.0) -> None:
    """Ping the Redis at ``redis://HOST:PORT`` once, with a short timeout."""
    try:
        import redis
    except ImportError:
        raise ScaleError(
            "torch's Redis caches need the Python client redis: "
            "pip install 'pytest-hotswap[cache]' (or redis>=5)"
        ) from None
    host, port = redis_address(location)
    client = redis.Redis(
        host=host, port=port, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        client.ping()
    except redis.RedisError as error:
        raise ScaleError(
            f"no Redis answers at {host}:{port} ({error}): start one (redis-server --port {port}) "
            "or give a directory instead"
        ) from None
    finally:
        client.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str | None:
    """The ``redis-server`` on ``PATH`` (Debian package redis-server), or ``None``."""
    return shutil.which(REDIS_SERVER)


@contextlib.contextmanager
def local_redis(directory: Path, *, timeout: float = 10.0) -> Iterator[str]:
    """A private ``redis-server`` on 127.0.0.1 and a free port, working in ``directory`` (no disk
    persistence), for as long as the block runs: yields its ``redis://127.0.0.1:PORT``."""
    binary = redis_server_binary()
    if binary is None:
        raise ScaleError(f"{REDIS_SERVER} is not installed (Debian package redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise ScaleError(f"{REDIS_SERVER} did not start on port {port}") from None
                time.sleep(0.05)
        yield f"{REDIS_PREFIX}127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def cache_counters() -> dict[str, int]:
    """torch's compile-cache counters in this process (all 0 when torch was never imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    if counters is None:
        return {name: 0 for _, name in CACHE_COUNTERS}
    return {name: int(counters[group][name]) for group, name in CACHE_COUNTERS}


def any_cache_activity(counters: Mapping[str, int]) -> bool:
    return any(counters.values())


def describe_counters(counters: Mapping[str, int]) -> str:
    """``fx graphs: 3 hits, 0 misses, 0 bypassed; autograd: ...`` for the summary."""
    parts = []
    for kind, prefix in (("fx graphs", "fxgraph_cache"), ("autograd", "autograd_cache")):
        hit, miss, bypass = (counters.get(f"{prefix}_{n}", 0) for n in ("hit", "miss", "bypass"))
        parts.append(f"{kind}: {hit} hits, {miss} misses, {bypass} bypassed")
    return "; ".join(parts)


def per_device_lines(records: Sequence[object]) -> list[str]:
    """``per device:`` totals for the summary; none when every test ran on the CPU (or on an
    unknown device: records of older reports)."""
    from pytest_hotswap.report import format_table

    devices: dict[str, list[object]] = {}
    for record in records:
        devices.setdefault(getattr(record, "device", "") or "?", []).append(record)
    if set(devices) <= {CPU, "?"}:
        return []
    rows = [
        (
            device,
            str(len(group)),
            str(sum(getattr(r, "compiles", 0) for r in group)),
            str(sum(getattr(r, "recompiles", 0) for r in group)),
            f"{sum(getattr(r, 'compile_s', 0.0) for r in group):.2f}",
        )
        for device, group in sorted(devices.items())
    ]
    return [
        "per device:",
        *format_table(("device", "tests", "compiles", "recompiles", "compile s"), rows),
    ]
