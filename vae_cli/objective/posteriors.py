"""Posterior families q(z|x): how the encoder's output becomes a distribution over z.

The encoder emits 2 x latent_dim numbers per example; a family turns them into q(z|x).
``gaussian`` is the diagonal Gaussian of Kingma & Welling (2014), its log-variance bounded
by a hardtanh (the VampPrior paper bounds it to [-6, 2]; the default bounds only keep
exp(logvar) finite in float32 and the standard deviation above zero).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from vae_cli.errors import UserError
from vae_cli.objective.priors import diagonal_normal


class Posterior(nn.Module):
    """q(z|x) from the encoder's output h [B, 2 * latent_dim]."""

    def forward(self, h: torch.Tensor) -> Distribution:
        raise NotImplementedError


class DiagonalGaussian(Posterior):
    """N(mu, diag(exp(logvar))) with logvar clamped to [logvar_min, logvar_max] (a hardtanh:
    no gradient pushes it further out)."""

    def __init__(self, logvar_min: float = -30.0, logvar_max: float = 20.0):
        super().__init__()
        if not -80.0 <= logvar_min < logvar_max <= 80.0:
            raise UserError(f"posterior.logvar_min={logvar_min} and logvar_max={logvar_max} "
                            "must satisfy -80 <= min < max <= 80 (exp(logvar) in float32)")
        self.bounds = (float(logvar_min), float(logvar_max))

    def forward(self, h: torch.Tensor) -> Distribution:
        mu, logvar = h.float().chunk(2, dim=-1)
        return diagonal_normal(mu, torch.exp(0.5 * logvar.clamp(*self.bounds)))
