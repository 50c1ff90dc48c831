"""Pipelines saved on disk: a folder written by ``save_pretrained``, or a hub id in the local cache.

Only ``model_index.json`` is read here, and nothing imports torch, so the plugin can check a
``--hotswap-pipelines`` path when the session starts without paying for torch.
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
    folder: Path
    denoiser: str  # "transformer" or "unet"
    missing: tuple[str, ...] = ()  # components saved as null (a tokenizer-free tiny pipeline)

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
        folder = path
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
    denoiser = next((name for name in DENOISER_NAMES if _is_component(components.get(name))), None)
    if denoiser is None:
        raise PipelineNotFoundError(
            f"{source!r}: the pipeline in {folder} has no denoiser (no {' or '.join(DENOISER_NAMES)} "
            "component in model_index.json); LoRA hotswapping needs a UNet or transformer"
        )
    missing = tuple(name for name, value in components.items() if value == [None, None])
    return SavedPipeline(source, folder, denoiser, missing)


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
    return "/" in name or os.sep in name or name.startswith((".", "~")) or Path(name).exists()


def label_of(name: str) -> str:
    """The column label of a ``--hotswap-pipelines`` entry: a path shows as its folder name."""
    if not looks_like_path(name):
        return name
    return SavedPipeline(name, Path(name), "").label
