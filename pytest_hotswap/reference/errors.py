"""The ``HotswapError`` family: every refusal of the reference hotswap, each saying what to do."""

from __future__ import annotations


class HotswapError(ValueError):
    """Base class: the model (and its adapter config) is unchanged when one of these is raised."""


class NotPreparedError(HotswapError):
    """The model has no LoRA adapter prepared for hotswapping (or no LoRA loaded at all)."""


class AlreadyCompiledError(HotswapError):
    """``prepare_for_hotswap`` was called on a compiled model: padding must happen before compiling."""


class AdapterNotFoundError(HotswapError):
    """No adapter of exactly this name is loaded (or prepared)."""


class RankTooLargeError(HotswapError):
    """An adapter's rank exceeds the ``max_rank`` the model was prepared (padded) for."""


class UnexpectedTargetsError(HotswapError):
    """The new adapter has keys for layers the prepared adapter does not target."""


class TextEncoderLoraError(HotswapError):
    """The new adapter carries text-encoder weights: only the denoiser can be hotswapped."""


class ShapeMismatchError(HotswapError):
    """A tensor of the new adapter has a non-rank dimension that does not fit its layer."""


class InvalidAdapterError(HotswapError):
    """The adapter cannot be read or is malformed: not safetensors, truncated, non-finite, bad dtype."""
