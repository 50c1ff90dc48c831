"""Pipelines saved on disk: a folder written by ``save_pretrained``, or a hub id in the local cache.

Only ``model_index.json`` is read here; diffusers is imported only to ask the pipeline class its
LoRA loader (which components it loads into), never torch at module level. A folder is
identified by its resolved absolute path (:func:`identity_of`): the same pipeline from any working
directory, and two folders of one name in different places are two pipelines. Its label (the
folder's name, with parents where two labels would clash) is for display only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from pytest_hotswap.adapters.header import DENOISER_NAMES
from pytest_hotswap.pipelines.families_table import FAMILIES


class PipelineNotFoundError(ValueError):
    """A ``--hotswap-pipelines`` entry that names no pipeline: the message says what is accepted."""


@dataclasses.dataclass(frozen=True)
class SavedPipeline:
    """A saved diffusers pipeline: a folder with ``model_index.json``, or a cached hub id."""

    source: str  # as given in --hotswap-pipelines
    folder: Path  # resolved, absolute
    denoiser: str  # the first LoRA-loadable diffusers model: "unet", "transformer" ...
    missing: tuple[str, ...] = ()  # components saved as null (a tokenizer-free tiny pipeline)
    class_name: str | None = None  # model_index.json's _class_name

    def pipeline_class(self) -> type:
        """The diffusers pipeline class ``model_index.json`` names (imports diffusers)."""
        import diffusers

        cls = getattr(diffusers, self.class_name or "", None)
        if not isinstance(cls, type):
            raise PipelineNotFoundError(
                f"{self.source!r}: model_index.json names the pipeline class "
                f"{self.class_name!r}, which diffusers {diffusers.__version__} does not have; "
                "build it yourself and return a PipelineSpec from a "
                "pytest_hotswap_build_pipeline hook"
            )
        return cls

    @property
    def label(self) -> str:
        """How the matrix and the reports name it: the folder's (or the repo's) name."""
        return Path(self.source.rstrip("/\\")).name or self.source


def find_saved_pipeline(source: str) -> SavedPipeline:
    """Check that ``source`` is a saved pipeline with a denoiser, reading only JSON files.

    A folder is used as is; anything else is looked up as a hub id in the local Hugging Face
    cache without any download. Raises :class:`PipelineNotFoundError` saying what was expected.
    """
    path = Path(source).expanduser()
    if path.exists():
        folder = path.resolve()
    elif _looks_like_hub_id(source):
        folder = _cached_snapshot(source)
    else:
        raise PipelineNotFoundError(
            f"{source!r}: no registered pipeline of that name ({', '.join(FAMILIES)}), no such "
            "folder, and not a hub id (owner/name); give a folder written by "
            "pipe.save_pretrained(...), a hub id in the local cache, or a name a "
            "pytest_hotswap_build_pipeline hook builds"
        )
    index = folder / "model_index.json"
    if not folder.is_dir() or not index.is_file():
        raise PipelineNotFoundError(
            f"{source!r}: {folder} is not a saved diffusers pipeline (no model_index.json); "
            "save one with pipe.save_pretrained(folder)"
        )
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PipelineNotFoundError(f"{source!r}: cannot read {index} ({error})") from None
    if not isinstance(components, dict):
        raise PipelineNotFoundError(f"{source!r}: {index} is not a JSON object")
    class_name = components.get("_class_name")
    class_name = class_name if isinstance(class_name, str) else None
    denoiser = next(
        (name for name in _denoiser_names(class_name) if _is_component(components.get(name))),
        None,
    )
    if denoiser is None:
        raise PipelineNotFoundError(
            f"{source!r}: the pipeline in {folder} has no denoiser (no {' or '.join(DENOISER_NAMES)} "
            "component in model_index.json); LoRA hotswapping needs a UNet or transformer"
        )
    missing = tuple(name for name, value in components.items() if value == [None, None])
    return SavedPipeline(source, folder, denoiser, missing, class_name)


def _denoiser_names(class_name: str | None) -> tuple[str, ...]:
    """Where the denoisers are: the components the pipeline class's LoRA loader declares that
    are diffusers models by name (``unet``, ``transformer``, ``transformer_2``), else the usual
    names (a class diffusers does not have, or one without a loader)."""
    if class_name is None:
        return DENOISER_NAMES
    try:
        import diffusers

        cls = getattr(diffusers, class_name, None)
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return DENOISER_NAMES
    loadable = getattr(cls, "_lora_loadable_modules", None)
    if not loadable:
        return DENOISER_NAMES
    return tuple(name for name in loadable if not name.startswith("text_encoder"))


def _is_component(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~", os.sep))


def _cached_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # the hub raises several types for "not in the cache"
        raise PipelineNotFoundError(
            f"{repo_id!r}: not found in the local Hugging Face cache ({type(error).__name__}); "
            "pytest-hotswap never downloads: run `huggingface-cli download "
            f"{repo_id}` once where the network is reachable, or give a folder"
        ) from None


def looks_like_path(name: str) -> bool:
    """Whether a ``--hotswap-pipelines`` entry names a folder or a hub id, not a registered name."""
    if name in FAMILIES:
        return False
    return "/" in name or os.sep in name or name.startswith((".", "~")) or Path(name).exists()


def identity_of(name: str) -> str:
    """What identifies a pipeline entry: an existing folder's resolved absolute path (the same
    from any working directory); a registered name, a hook's name or a hub id as given."""
    if not looks_like_path(name):
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def label_of(name: str, among: tuple[str, ...] | list[str] = ()) -> str:
    """The column label of a ``--hotswap-pipelines`` entry: a path shows as its folder name,
    with as many parent folders as it takes to tell it from the other entries ``among``."""
    if not looks_like_path(name):
        return name
    parts = Path(name.rstrip("/\\")).parts
    others = {
        Path(other.rstrip("/\\")).parts
        for other in among
        if looks_like_path(other) and identity_of(other) != identity_of(name)
    }
    for depth in range(1, len(parts) + 1):
        label = parts[-depth:]
        if not any(other[-depth:] == label for other in others):
            return "/".join(label) or name
    return name
