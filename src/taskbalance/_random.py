"""Seeded random number generators owned by methods (RLW, IGBv2, PCGrad, GradVac, GradDrop): no global RNG."""

from __future__ import annotations

import torch


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from torch's global RNG when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator.manual_seed(seed)
    return generator
