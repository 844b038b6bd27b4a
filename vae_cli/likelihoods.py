"""Reconstruction terms -log p(x|z), summed over every dimension of one example.

Protocol: ``out_mult`` decoder outputs per data channel; ``nll(out, x)`` returns [B] nats;
``mean(out)`` returns the image to show, in [0, 1]. Log-densities are computed in float32
even when the decoder ran under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.errors import UserError


class Likelihood(nn.Module):
    out_mult: int = 1

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Bernoulli with logits: binary_cross_entropy_with_logits, never sigmoid then BCE.

    On grey-level targets in [0, 1] this is the usual 'continuous Bernoulli-free' BCE
    used by pytorch/examples; it is a likelihood in nats only on binary data.
    """

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(out.float(), x, reduction="none")
        return bce.flatten(1).sum(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out.float())


class Gaussian(Likelihood):
    """Gaussian with the decoder output as mean and a fixed standard deviation sigma."""

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        if not sigma > 0:
            raise UserError(f"loss.sigma={sigma} must be > 0")
        self.sigma = float(sigma)
        self._log_norm = math.log(self.sigma) + 0.5 * math.log(2 * math.pi)

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sq = ((x - out.float()) / self.sigma).pow(2).flatten(1)
        return 0.5 * sq.sum(1) + sq.shape[1] * self._log_norm

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().clamp(0, 1)
