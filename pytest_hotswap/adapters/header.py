"""One reader for LoRA adapter files: the safetensors header (names, shapes, dtypes, metadata).

Shared by the reference hotswap (which file it may open at all), the fixtures (an adapter's rank
for a step label), the catalog and ``pytest-hotswap inspect``. It loads no tensor except the
per-layer kohya ``alpha`` scalars, imports no torch, and never opens anything but a regular
``.safetensors`` file: a pickle could run code, a FIFO would block forever.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Pipeline attributes that hold the model a denoiser LoRA targets, in diffusers' naming.
DENOISER_NAMES = ("unet", "transformer")
#: Pipeline attributes of the text encoders diffusers loads LoRA keys into (``text_encoder.``,
#: ``text_encoder_2.`` ... keys).
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")

#: How a verdict names an adapter in PEFT's own key format, which diffusers' loaders cannot read.
PEFT_NATIVE = "PEFT-native keys (base_model.model.)"

#: The safetensors metadata key diffusers and PEFT write the adapter's ``LoraConfig`` under.
METADATA_KEY = "lora_adapter_metadata"
#: The safetensors metadata key naming the denoisers an adapter is for, a JSON list
#: (``make_lora(..., denoisers=["transformer_2"])`` writes it): Wan 2.2's loader reads the same
#: ``transformer.`` keys into either expert, so only this says a file is for one of them. A file
#: without it goes into every denoiser the pipeline's loader reaches.
DENOISERS_KEY = "hotswap_denoisers"

#: Text-encoder keys in diffusers / PEFT (text_encoder., text_encoder_2.), kohya (lora_te_,
#: lora_te1_, lora_te2_) and single-file (te_, text_encoders.) namings.
TEXT_ENCODER_KEY = re.compile(r"^(text_encoder(_\d)?[._]|lora_te\d?_|te\d?_|text_encoders\.)")

# "<layer>.lora_A.weight", "<layer>.lora_A.<adapter>.weight", kohya's "<layer>.lora_down.weight",
# and the older diffusers "<layer>.lora.down.weight" / "<layer>.lora_linear_layer.down.weight".
_LORA_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up"
    r"|lora_linear_layer\.down|lora_linear_layer\.up)(?:\.[^.]+)?\.weight$"
)
_DOWN_PARTS = ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down")
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
}
_COMPONENTS = ("unet", "transformer", "prior", "decoder")
#: Keys of tuners that are not plain LoRA: DoRA's magnitude, LoKr, LoHa, OFT / BOFT, IA3.
_OTHER_TUNERS = (
    ("DoRA", re.compile(r"(lora_magnitude_vector|dora_scale)")),
    ("LoKr", re.compile(r"lokr_")),
    ("LoHa", re.compile(r"hada_")),
    ("OFT", re.compile(r"(oft_|boft_)")),
    ("IA3", re.compile(r"ia3_")),
)
_PICKLE_HINT = (
    "is a pickle (torch.save) file, not safetensors: loading a pickle can run code; convert it "
    "to .safetensors with a tool you trust (safetensors.torch.save_file)"
)


class AdapterFileError(ValueError):
    """The file cannot be read as a LoRA adapter; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One adapted layer as the file describes it."""

    name: str  # as written in the file, e.g. "transformer.x_embedder" or "lora_unet_conv_in"
    rank: int
    in_shape: tuple[int, ...]  # lora_A's shape after the rank: (in,) or (in / groups, kh, kw)
    out_features: int | None  # lora_B's first dimension (None when the file lacks lora_B)

    @property
    def component(self) -> str:
        return layer_key(self.name).partition("/")[0]

    @property
    def in_numel(self) -> int:
        total = 1
        for size in self.in_shape:
            total *= size
        return total


@dataclasses.dataclass(frozen=True)
class AdapterHeader:
    """What a LoRA file's header says. Layers are keyed by :func:`canonical_key`
    (``denoiser/module_path``, ``.`` and ``_`` unified), so kohya, diffusers and PEFT files for
    the same model compare equal."""

    path: str
    format: str  # "diffusers", "peft", "kohya" or "unknown"
    layers: dict[str, Layer]
    dtypes: frozenset[str]
    metadata: dict[str, str]
    alphas: dict[str, float]  # layer key -> alpha, from the metadata or kohya's alpha tensors
    tuner: str  # "LoRA", or the other tuner its keys belong to ("DoRA", "LoKr" ...)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {key: layer.rank for key, layer in self.layers.items()}

    @property
    def alpha(self) -> float | dict[str, float] | None:
        """One alpha when all layers share it, the per-layer values when they differ."""
        values = set(self.alphas.values())
        if len(values) == 1:
            return next(iter(values))
        return dict(self.alphas) or None

    @property
    def text_encoder_layers(self) -> list[str]:
        return [
            layer.name
            for layer in self.layers.values()
            if layer.component.startswith("text_encoder")
        ]

    @property
    def denoisers(self) -> tuple[str, ...] | None:
        """The denoisers the file says it is for (:data:`DENOISERS_KEY`), else ``None``."""
        raw = self.metadata.get(DENOISERS_KEY)
        if raw is None:
            return None
        try:
            names = json.loads(raw)
        except json.JSONDecodeError:
            names = None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise AdapterFileError(
                f"{self.path}: metadata {DENOISERS_KEY}={raw!r} is not a JSON list of denoiser "
                'names (["transformer_2"])'
            )
        return tuple(names)

    @property
    def denoiser_keys(self) -> list[str]:
        return [
            key
            for key, layer in self.layers.items()
            if not layer.component.startswith("text_encoder")
        ]

    def lora_macs(self, keys: Iterable[str] | None = None, rank: int | None = None) -> int:
        """Multiply-adds of the LoRA branch per token (per output pixel for convs) at ``rank``
        (its own rank per layer when ``None``), over ``keys`` (every layer when ``None``)."""
        chosen = (
            self.layers if keys is None else {k: self.layers[k] for k in keys if k in self.layers}
        )
        return sum(
            (rank or layer.rank) * (layer.in_numel + (layer.out_features or 0))
            for layer in chosen.values()
        )


def check_adapter_path(path: str | os.PathLike[str]) -> Path:
    """The path of a regular, readable ``.safetensors`` file, else an :class:`AdapterFileError`."""
    file = Path(path)
    if "\0" in str(file):  # pathlib raises ValueError("embedded null byte") on it
        raise AdapterFileError(
            f"{str(file)!r}: the path holds a NUL byte, which no file name can; check how the "
            "path was built"
        )
    try:
        mode = file.stat().st_mode
    except OSError as error:
        raise _os_error(file, error) from None
    if stat.S_ISDIR(mode):
        raise AdapterFileError(f"{file}: is a directory; give the .safetensors file inside it")
    if not stat.S_ISREG(mode):
        raise AdapterFileError(
            f"{file}: not a regular file (a FIFO, socket or device); adapters are read from "
            "regular .safetensors files only"
        )
    try:
        with file.open("rb") as handle:
            head = handle.read(9)
    except OSError as error:  # unreadable (permissions), or replaced since the stat
        raise _os_error(file, error) from None
    # safetensors: an 8-byte header length, then the JSON header; torch.save: a zip or a pickle.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise AdapterFileError(f"{file}: {_PICKLE_HINT}")
    if file.suffix != ".safetensors":
        raise AdapterFileError(
            f"{file}: only .safetensors adapters are read (pickle files can run code); "
            "convert it with safetensors.torch.save_file"
        )
    return file


def _os_error(file: Path, error: OSError) -> AdapterFileError:
    """One line for an operating-system error on ``file``: what happened and what to do."""
    if isinstance(error, FileNotFoundError):
        return AdapterFileError(f"{file}: no such file")
    if isinstance(error, IsADirectoryError):
        return AdapterFileError(f"{file}: is a directory; give the .safetensors file inside it")
    if isinstance(error, PermissionError):
        return AdapterFileError(
            f"{file}: permission denied; make the file (and its folder) readable for this user, "
            "or copy it somewhere readable"
        )
    return AdapterFileError(
        f"{file}: cannot read it ({error.strerror or error}); check the file and its disk"
    )


def read_header(path: str | os.PathLike[str]) -> AdapterHeader:
    """Read one adapter's header; anything unreadable is an :class:`AdapterFileError`."""
    from safetensors import SafetensorError, safe_open

    file = check_adapter_path(path)
    try:
        with safe_open(str(file), framework="numpy") as handle:
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
            dtypes = frozenset(str(handle.get_slice(key).get_dtype()) for key in keys)
            metadata = dict(handle.metadata() or {})
            kohya_alphas = {key: handle.get_tensor(key) for key in keys if key.endswith(".alpha")}
    except SafetensorError as error:
        raise AdapterFileError(
            f"{file}: not a valid safetensors file ({error}); truncated or corrupt?"
        ) from None
    except OSError as error:
        raise _os_error(file, error) from None
    return header_from(str(file), keys, shapes, dtypes, metadata, kohya_alphas)


def header_from(
    path: str,
    keys: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    dtypes: Iterable[str],
    metadata: Mapping[str, str],
    kohya_alphas: Mapping[str, Any] | None = None,
) -> AdapterHeader:
    """Build the header description from raw names, shapes and metadata (also for state dicts)."""
    down: dict[str, tuple[str, tuple[int, ...]]] = {}
    up: dict[str, tuple[int, ...]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        shape = tuple(int(size) for size in shapes[key])
        if len(shape) < 2:
            raise AdapterFileError(
                f"{path}: {key} has shape {shape}; LoRA weights have 2 dimensions (Linear) or "
                "4 (Conv2d): the file is corrupt or not a LoRA adapter"
            )
        layer = canonical_key(match["layer"])
        if match["part"] in _DOWN_PARTS:
            down[layer] = (match["layer"], shape)
        else:
            up[layer] = shape
    tuner = next(
        (name for name, pattern in _OTHER_TUNERS if any(map(pattern.search, keys))), "LoRA"
    )
    if not down:
        if tuner != "LoRA":
            raise AdapterFileError(
                f"{path}: a {tuner} adapter, not a LoRA one; only LoRA is hotswapped"
            )
        raise AdapterFileError(
            f"{path}: no LoRA weights in it (no lora_A / lora_down keys): is it a LoRA adapter?"
        )
    layers = {
        key: Layer(
            name=name,
            rank=shape[0],
            in_shape=shape[1:],
            out_features=up[key][0] if key in up else None,
        )
        for key, (name, shape) in down.items()
    }
    alphas = _alphas_from_metadata(path, metadata, layers)
    for key, value in (kohya_alphas or {}).items():
        layer = canonical_key(key.removesuffix(".alpha"))
        if layer in layers:
            alphas[layer] = _scalar(path, key, value)
    return AdapterHeader(
        path=path,
        format=_detect_format(keys),
        layers=layers,
        dtypes=frozenset(dtypes),
        metadata=dict(metadata),
        alphas=alphas,
        tuner=tuner,
    )


def layer_key(layer: str) -> str:
    """``component/module_path`` for a layer name in any naming; kohya's ``_`` and diffusers'
    ``.`` unified (``transformer.a.b`` and ``lora_transformer_a_b`` -> ``transformer/a_b``)."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if layer.startswith(prefix):
            return f"{component}/{layer[len(prefix) :]}"
    component, _, rest = layer.partition(".")
    if component in _COMPONENTS or component.startswith("text_encoder"):
        return f"{component}/{rest.replace('.', '_')}"
    return f"/{layer.removeprefix('base_model.model.').replace('.', '_')}"


def canonical_key(layer: str) -> str:
    """:func:`layer_key` with every denoiser naming (``unet``, ``transformer``, none) unified to
    ``denoiser``: the key under which files in different styles compare equal."""
    component, _, path = layer_key(layer).partition("/")
    return f"{component if component.startswith('text_encoder') else 'denoiser'}/{path}"


def _detect_format(keys: Sequence[str]) -> str:
    if any(key.startswith(tuple(_KOHYA_PREFIXES)) for key in keys):
        return "kohya"
    if any(key.partition(".")[0] in _COMPONENTS or key.startswith("text_encoder") for key in keys):
        return "diffusers"
    return "peft"


def parse_metadata(path: str, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The ``LoraConfig`` dict in the file's metadata (keys may carry a component prefix)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{path}: its {METADATA_KEY} is not JSON ({error})") from None
    if config is None:  # diffusers reads null as "no metadata"
        return None
    if not isinstance(config, dict):
        raise AdapterFileError(
            f"{path}: its {METADATA_KEY} is a JSON {type(config).__name__}, not an object of "
            "LoraConfig fields; write the adapter again with diffusers or PEFT"
        )
    return config


def _alphas_from_metadata(
    path: str, metadata: Mapping[str, str], layers: Mapping[str, Layer]
) -> dict[str, float]:
    config = parse_metadata(path, metadata)
    if not config:
        return {}
    by_component: dict[str, Any] = {}
    patterns: dict[str, Any] = {}
    for key, value in config.items():
        if key.endswith("lora_alpha"):
            by_component[key.removesuffix("lora_alpha").rstrip(".")] = value
        elif key.endswith("alpha_pattern") and value:
            if not isinstance(value, dict):
                raise AdapterFileError(
                    f"{path}: alpha_pattern in its {METADATA_KEY} is {value!r}, not an object of "
                    "module name -> alpha"
                )
            patterns[key.removesuffix("alpha_pattern").rstrip(".")] = value
    alphas: dict[str, float] = {}
    for key, layer in layers.items():
        component = layer.component
        value = by_component.get(component, by_component.get(""))
        if value is None:
            continue
        pattern = _pattern_value(path, patterns.get(component, patterns.get("")), layer.name)
        value = value if pattern is None else pattern
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdapterFileError(
                f"{path}: lora_alpha in its {METADATA_KEY} is {value!r}, not a number"
            )
        alphas[key] = float(value)
    return alphas


def _pattern_value(path: str, pattern: Mapping[str, Any] | None, name: str) -> Any:
    """The value of the first ``alpha_pattern`` key matching layer ``name``, as PEFT resolves it
    (``peft.utils.other.get_pattern_key``: the key matches the end of the dotted module path;
    restated here because this module imports neither torch nor PEFT)."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as error:
            raise AdapterFileError(
                f"{path}: alpha_pattern key {key!r} is not a regular expression ({error})"
            ) from None
    return None


def _scalar(path: str, key: str, value: Any) -> float:
    size = getattr(value, "size", 1)
    if size != 1:
        raise AdapterFileError(
            f"{path}: {key} holds {size} values; a kohya alpha is one number per layer"
        )
    return float(value.reshape(()) if hasattr(value, "reshape") else value)
