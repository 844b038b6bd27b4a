"""Priors p(z): small modules that hand out a torch.distributions object.

Protocol: ``dist()`` returns a distribution with event shape [latent_dim]; ``sample(n)``
and ``log_prob(z)`` follow from it, so any divergence meets any prior.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal


class Prior(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def dist(self) -> Distribution:
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        return self.dist().sample((n,))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.dist().log_prob(z)


class NormalPrior(Prior):
    """Standard normal N(0, I)."""

    def __init__(self, *, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers so that .to(device) moves them and no parameter is trained.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def dist(self) -> Distribution:
        return Independent(Normal(self.loc, self.scale), 1)
