"""The plugin's options, each declared once: name, default, parser and help text.

The pytest plugin, the ``pytest-hotswap`` command and ``make bench`` derive their option tables
from :data:`OPTIONS`; :class:`HotswapOptions` takes its field defaults from the same declarations.
Every parser raises ``ValueError`` with a message naming the accepted values; callers turn it into
their own usage error naming the option. Nothing here imports torch, except resolving ``auto``
device, which happens only when something needs a device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pytest_hotswap.reference import DEFAULT_MAX_RANK

BACKENDS = ("eager", "aot_eager", "inductor")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8-weight-only", "float8-weight-only", "float8-dynamic")
#: How the denoisers are compiled: the whole module, or diffusers' ``compile_repeated_blocks``.
COMPILE_SCOPES = ("whole", "regional")
AUTO = "auto"


def parse_max_rank(value: object) -> int:
    """An integer >= 1 (``auto`` is handled by :func:`parse_max_rank_or_auto`)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    try:
        rank = int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected an integer >= 1 or 'auto', got {value!r}") from None
    if rank < 1:
        raise ValueError(f"expected an integer >= 1 or 'auto', got {rank}")
    return rank


def parse_max_rank_or_auto(value: object) -> int | str:
    """``auto`` (the largest rank in the adapter catalog) or an integer >= 1."""
    if str(value).strip() == AUTO:
        return AUTO
    return parse_max_rank(value)


def parse_choice(value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    text = str(value).strip()
    if text not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}; got {text!r}")
    return text


def parse_list(value: object, choices: Iterable[str] | None = None) -> tuple[str, ...]:
    """A comma list (or an iterable of names); unknown names are refused when ``choices`` is given."""
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise ValueError("expected a comma-separated list with at least one name")
    if choices is not None:
        known = tuple(choices)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(
                f"unknown {', '.join(unknown)}; expected names from {', '.join(known)}"
            )
    return names


def parse_path(value: object) -> Path:
    text = str(value).strip()
    if not text:
        raise ValueError("expected a path, got an empty value")
    return Path(text)


def parse_fail_on(value: object) -> str:
    """Thresholds like ``recompiles:0,compile_s:+50%``, checked now and kept as written."""
    from pytest_hotswap.report import parse_fail_on as parse_thresholds

    parse_thresholds(str(value))
    return str(value)


def parse_devices(value: object) -> str | int | tuple[int, ...]:
    """``auto``, a number of GPUs ``N`` >= 1, or CUDA devices like ``cuda:0,cuda:2`` (indices
    into the GPUs this process may see, in the order given, repeats dropped)."""
    text = str(value).strip()
    if text == AUTO:
        return AUTO
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise ValueError(f"expected auto, a number of GPUs >= 1 or cuda:I,cuda:J; got {text!r}")
        return count
    indices: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        kind, _, index = part.partition(":")
        if kind != "cuda" or not index.isdigit():
            raise ValueError(
                f"expected auto, a number of GPUs >= 1 or a comma list of CUDA devices like "
                f"cuda:0,cuda:2; got {part!r}"
            )
        indices.append(int(index))
    return tuple(dict.fromkeys(indices))


def parse_compile_cache(value: object) -> str:
    """A directory, or ``redis://HOST[:PORT]`` (torch's Redis remote caches), kept as written
    (a Redis address normalised to ``redis://HOST:PORT``)."""
    text = str(value).strip()
    if not text:
        raise ValueError("expected a directory or redis://HOST:PORT, got an empty value")
    if "://" not in text:
        return text
    from urllib.parse import urlsplit

    url = urlsplit(text)
    try:
        port = url.port or 6379
    except ValueError:
        port = 0
    if url.scheme != "redis" or not url.hostname or not 0 < port < 65536:
        raise ValueError(f"expected a directory or redis://HOST:PORT; got {text!r}")
    if url.path.strip("/") or url.query or url.username or url.password:
        raise ValueError(
            f"{text!r}: give only redis://HOST:PORT (torch's remote caches read a host and a port)"
        )
    return f"redis://{url.hostname}:{port}"


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    return lambda value: parse_choice(value, choices)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: ``--hotswap-NAME`` on the command line, ``hotswap_NAME`` in an ini file."""

    name: str
    default: Any
    parse: Callable[[object], Any]
    help: str
    flag: bool = False
    path: bool = False  # an ini value is relative to the ini file, like pytest's own paths
    attribute: str | None = None  # the HotswapOptions field, when not the name's

    @property
    def cli(self) -> str:
        return f"--hotswap-{self.name}"

    @property
    def field(self) -> str:
        return self.attribute or self.name.replace("-", "_")

    @property
    def ini(self) -> str:
        return f"hotswap_{self.name.replace('-', '_')}"

    def help_text(self) -> str:
        """The help with its default, as ``--help`` and ``pytest-hotswap --help`` show it."""
        if self.flag or self.default is None:
            return self.help
        default = ",".join(self.default) if isinstance(self.default, tuple) else self.default
        return f"{self.help}. Default: {default}"


MAX_RANK = Option(
    "max-rank",
    DEFAULT_MAX_RANK,
    parse_max_rank_or_auto,
    "Rank every LoRA is padded to before compiling; auto: the largest rank in --hotswap-adapters",
)
BACKEND = Option(
    "backend", "inductor", _choice(BACKENDS), f"torch.compile backend: {', '.join(BACKENDS)}"
)
MODE = Option("mode", "default", _choice(MODES), f"torch.compile mode: {', '.join(MODES)}")
DEVICE = Option(
    "device",
    AUTO,
    _choice(DEVICES),
    "Device for the built pipelines: auto (cuda when available), cpu, cuda",
)
DTYPE = Option(
    "dtype",
    AUTO,
    _choice(DTYPES),
    "Dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16",
)
QUANTIZE_OPTION = Option(
    "quantize",
    "none",
    _choice(QUANTIZE),
    f"Quantize the base model with torchao: {', '.join(QUANTIZE)} (float8-dynamic: CUDA, cc >= 8.9)",
)
PIPELINES = Option(
    "pipelines",
    ("sd", "flux"),
    parse_list,
    "Comma list of pipelines: registered names (sd, sdxl, sd3, flux, wan, qwenimage, chroma, zimage and names hooks add), saved diffusers "
    "pipeline folders, or hub ids in the local cache",
)
IMPLEMENTATIONS = Option(
    "implementations",
    ("diffusers", "reference"),
    parse_list,
    "Comma list of hotswap implementations: diffusers (diffusers + PEFT as installed), peft "
    "(PEFT directly), reference, and names hooks add",
)
ADAPTERS = Option(
    "adapters",
    None,
    str,
    "Adapter catalog to test: a directory of .safetensors files or a glob",
    path=True,
)
STRICT = Option("strict", False, bool, "Every test behaves as if marked no_recompile", flag=True)
FRESH = Option(
    "fresh",
    False,
    bool,
    "Reset dynamo before every marked test (exact, slower: everything compiles again)",
    flag=True,
)
COUNT_ALL = Option(
    "count-all",
    False,
    bool,
    "Marked tests compile on past their allowance and count every recompile (default: fail at "
    "the guard of the first recompile past it, before compiling)",
    flag=True,
)
REPORT = Option("report", None, parse_path, "Write the JSON compile report to this path", path=True)
BASELINE = Option(
    "baseline",
    None,
    parse_path,
    "Compare with this JSON report (written by --hotswap-report)",
    path=True,
)
FAIL_ON = Option(
    "fail-on",
    None,
    parse_fail_on,
    "Thresholds against the baseline, e.g. recompiles:0,compile_s:+50%",
)
COMPILE = Option(
    "compile",
    "whole",
    _choice(COMPILE_SCOPES),
    "How each denoiser is compiled: whole (the module) or regional (diffusers' "
    "compile_repeated_blocks: the block classes of the model's _repeated_blocks, one compiled "
    "code per class shared by every block of a denoiser)",
    attribute="compile_scope",
)

DEVICE_LIST = Option(
    "devices",
    AUTO,
    parse_devices,
    "GPUs for the run: auto (every visible GPU; the CPU on a host without one), N (the first N) "
    "or cuda:0,cuda:2. Under pytest-xdist worker K uses device K mod N, pinned with "
    "CUDA_VISIBLE_DEVICES before CUDA starts; without xdist the first one",
)
COMPILE_CACHE = Option(
    "compile-cache",
    None,
    parse_compile_cache,
    "Where torch's compile caches live, shared by xdist workers and runs: a directory "
    "(TORCHINDUCTOR_CACHE_DIR) or redis://HOST:PORT (torch's Redis remote caches; needs the "
    "cache extra). The summary and the report give the cache hits and misses",
)

OPTIONS: tuple[Option, ...] = (
    MAX_RANK,
    BACKEND,
    MODE,
    DEVICE,
    DTYPE,
    QUANTIZE_OPTION,
    PIPELINES,
    IMPLEMENTATIONS,
    ADAPTERS,
    STRICT,
    FRESH,
    COUNT_ALL,
    REPORT,
    BASELINE,
    FAIL_ON,
    DEVICE_LIST,
    COMPILE_CACHE,
    COMPILE,
)
BY_FIELD = {option.field: option for option in OPTIONS}


@dataclasses.dataclass(frozen=True)
class HotswapOptions:
    """What the fixtures build and how. ``device`` / ``dtype`` may still read ``auto`` until
    :meth:`resolved` is called (the ``hotswap_options`` fixture hands out resolved ones)."""

    max_rank: int = MAX_RANK.default
    backend: str = BACKEND.default
    mode: str = MODE.default
    device: str = DEVICE.default
    dtype: str = DTYPE.default
    quantize: str = QUANTIZE_OPTION.default
    pipelines: tuple[str, ...] = PIPELINES.default
    implementations: tuple[str, ...] = IMPLEMENTATIONS.default
    adapters: str | None = ADAPTERS.default
    strict: bool = STRICT.default
    fresh: bool = FRESH.default
    count_all: bool = COUNT_ALL.default
    report: Path | None = REPORT.default
    baseline: Path | None = BASELINE.default
    fail_on: str | None = FAIL_ON.default
    devices: str | int | tuple[int, ...] = DEVICE_LIST.default
    compile_cache: str | None = COMPILE_CACHE.default
    compile_scope: str = COMPILE.default

    @property
    def is_resolved(self) -> bool:
        return AUTO not in (self.device, self.dtype)

    def resolved(self) -> HotswapOptions:
        """A copy with ``auto`` device and dtype resolved (imports torch only for ``auto`` device)."""
        if self.is_resolved:
            return self
        device = resolve_device(self.device)
        return dataclasses.replace(self, device=device, dtype=resolve_dtype(self.dtype, device))

    def replace(self, **changes: object) -> HotswapOptions:
        """A resolved copy with some fields changed (the ``hotswap`` marker, the pipeline factory).

        Values are parsed like the options they stand for; a bad value raises ``ValueError``
        naming the field and the accepted values.
        """
        parsed: dict[str, object] = {}
        for name, value in changes.items():
            option = BY_FIELD.get(name)
            if option is None:
                raise ValueError(f"{name}: not an option; options are {', '.join(BY_FIELD)}")
            if value is None:
                continue
            try:
                parsed[name] = parse_max_rank(value) if option is MAX_RANK else option.parse(value)
            except ValueError as error:
                raise ValueError(f"{name}={value!r}: {error}") from None
        if "device" in parsed:
            parsed["device"] = resolve_device(str(parsed["device"]))
        if "dtype" in parsed:
            device = str(parsed.get("device", self.device))
            parsed["dtype"] = resolve_dtype(str(parsed["dtype"]), resolve_device(device))
        return dataclasses.replace(self, **parsed).resolved()  # type: ignore[arg-type]

    def describe(self) -> str:
        """The settings as the header and the conformance matrix print them."""
        return (
            f"max_rank={self.max_rank} backend={self.backend} mode={self.mode} "
            f"device={self.device} dtype={self.dtype} quantize={self.quantize} "
            f"compile={self.compile_scope}"
        )


def resolve_device(device: str) -> str:
    if device != AUTO:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != AUTO:
        return dtype
    return "bfloat16" if device == "cuda" else "float32"
