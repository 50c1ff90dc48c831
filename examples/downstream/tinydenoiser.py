"""The downstream repo's own model: a tiny denoiser that is a plain ``nn.Module``, not diffusers.

In a real repo this lives in the project's package; the example keeps it next to ``conftest.py``.
PEFT puts LoRA layers on its ``nn.Linear`` layers, which is all pytest-hotswap needs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TinyDenoiser(nn.Module):
    """Predicts the noise in a latent ``sample`` at ``timestep``: an MLP with a time embedding."""

    def __init__(self, channels: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.time_embed = nn.Linear(1, hidden)
        self.proj_in = nn.Linear(channels, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.proj_out = nn.Linear(hidden, channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(self.proj_in(sample) + self.time_embed(timestep[:, None]))
        return self.proj_out(F.silu(self.mid(hidden)))


def build_denoiser(
    seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> TinyDenoiser:
    """The same weights for the same seed: the model a test suite can compare outputs of."""
    torch.manual_seed(seed)
    return TinyDenoiser().to(device, dtype).eval()


def denoiser_inputs(
    seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Keyword arguments of one denoiser call: a batch of two noisy latents at timestep 500."""
    noise = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
    return {
        "sample": noise.to(device, dtype),
        "timestep": torch.full((2,), 500.0, device=device, dtype=dtype),
    }


@torch.no_grad()
def sample(
    model: nn.Module,
    seed: int = 0,
    steps: int = 4,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A deterministic few-step sampler: start from seeded noise, subtract predicted noise.

    Timesteps are tensors, not Python numbers, so a new timestep never recompiles the model.
    """
    x = denoiser_inputs(seed, device, dtype)["sample"]
    for t in torch.linspace(1000.0, 0.0, steps, device=device, dtype=dtype):
        x = x - model(x, t.repeat(x.shape[0])) / steps
    return x
