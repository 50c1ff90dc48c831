"""The repo's model on its own: hotswap comparisons need it deterministic for a seed."""

from __future__ import annotations

import torch
from tinydenoiser import build_denoiser, sample


def test_same_seed_same_samples():
    assert torch.equal(sample(build_denoiser(seed=0)), sample(build_denoiser(seed=0)))
    assert not torch.allclose(sample(build_denoiser(seed=0)), sample(build_denoiser(seed=1)))
