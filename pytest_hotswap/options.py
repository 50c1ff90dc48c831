"""The resolved plugin options: one frozen dataclass, parsed and validated without pytest.

Every parser raises ``ValueError`` with a message naming the accepted values; the plugin turns
that into a ``pytest.UsageError`` naming the option. Nothing here imports torch at module level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

BACKENDS = ("eager", "aot_eager", "inductor")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8-weight-only", "float8-weight-only", "float8-dynamic")
BUILTIN_PIPELINES = ("sd", "flux")
IMPLEMENTATIONS = ("diffusers", "reference")


@dataclasses.dataclass(frozen=True)
class HotswapOptions:
    """What the fixtures build and how; ``device`` and ``dtype`` are resolved from ``auto``."""

    max_rank: int = 128
    backend: str = "inductor"
    mode: str = "default"
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str = "none"
    pipelines: tuple[str, ...] = BUILTIN_PIPELINES
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    strict: bool = False
    report: Path | None = None
    baseline: Path | None = None
    fail_on: str | None = None

    def replace(self, **changes: object) -> HotswapOptions:
        """A copy with some fields changed (the ``hotswap`` marker, the pipeline factory).

        Values are validated again and ``auto`` device / dtype resolved; a bad value raises
        ``ValueError`` naming the field and the accepted values.
        """
        for name, value in changes.items():
            if name in _VALIDATORS and value is not None:
                try:
                    changes[name] = _VALIDATORS[name](value)
                except ValueError as error:
                    raise ValueError(f"{name}={value!r}: {error}") from None
        if changes.get("dtype") is not None:
            device = str(changes.get("device") or self.device)
            changes["dtype"] = resolve_dtype(str(changes["dtype"]), device)
        return dataclasses.replace(self, **changes)


def parse_max_rank(value: object) -> int:
    try:
        rank = int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected an integer >= 1, got {value!r}") from None
    if rank < 1:
        raise ValueError(f"expected an integer >= 1, got {rank}")
    return rank


def parse_choice(value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    text = str(value).strip()
    if text not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}; got {text!r}")
    return text


def parse_list(value: object, choices: Iterable[str] | None = None) -> tuple[str, ...]:
    """A comma list (or an iterable of names); unknown names are refused when ``choices`` is given."""
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[arg-type]
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


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


_VALIDATORS = {
    "max_rank": parse_max_rank,
    "backend": lambda v: parse_choice(v, BACKENDS),
    "mode": lambda v: parse_choice(v, MODES),
    "quantize": lambda v: parse_choice(v, QUANTIZE),
    "device": lambda v: resolve_device(parse_choice(v, DEVICES)),
    "dtype": lambda v: parse_choice(v, DTYPES),  # resolved against the device by replace
    "implementations": lambda v: parse_list(v, IMPLEMENTATIONS),
    "pipelines": parse_list,
}
