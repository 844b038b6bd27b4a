"""The model: encoder q(z|x), decoder p(x|z) through a likelihood, and a prior p(z).

How their terms combine into a loss or a bound is not here but in ``bounds.py``; this module
only computes distributions, samples and decodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Distribution

from vae_cli.nets import Networks
from vae_cli.objective.likelihoods import Likelihood
from vae_cli.objective.priors import Prior, diagonal_normal

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32 and std > 0


class Shard(NamedTuple):
    """This process's slice of a global batch under data parallelism: (rank, world)."""

    rank: int = 0
    world: int = 1


WHOLE = Shard()


class VAE(nn.Module):
    def __init__(self, nets: Networks, prior: Prior, likelihood: Likelihood, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder = nets.encoder, nets.decoder
        self.prior, self.likelihood, self.latent_dim = prior, likelihood, latent_dim
        # A sequence decoder reads the sequence it scores (teacher forcing): decode(z, x).
        self.autoregressive = nets.autoregressive
        self.out_numel = nets.out_numel  # decoder outputs per example, where large
        prior.bind(self.posterior)

    def posterior(self, x: torch.Tensor) -> Distribution:
        mu, logvar = self.encoder(x).float().chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        return diagonal_normal(mu, std)

    def rsample(self, q: Distribution, k: int | None = None,
                shard: Shard = WHOLE) -> torch.Tensor:
        """z = mu + sigma * eps, [B, D] (or [k, B, D]). Under data parallelism each rank
        draws the noise of the whole global batch and keeps its own rows, so N ranks use
        exactly the noise one process would, and the random streams stay in step."""
        mu, std = q.base_dist.loc, q.base_dist.scale
        lead = () if k is None else (k,)
        eps = torch.randn(*lead, shard.world * len(mu), mu.shape[-1], device=mu.device,
                          dtype=mu.dtype)
        return mu + std * eps[..., shard.rank * len(mu):(shard.rank + 1) * len(mu), :]

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z, x) if self.autoregressive else self.decoder(z)

    def log_px(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) for z [B, D] -> [B], or z [k, B, D] -> [k, B]. For images x broadcasts
        against the k decodes (no k copies of the batch in memory); a sequence decoder reads
        x once per sample, and its k copies are scored as one batch."""
        if z.dim() == 2:
            return -self.likelihood.nll(self.decode(z, x), x)
        k, flat = len(z), z.reshape(-1, z.shape[-1])
        if self.autoregressive:
            xs = x.expand(k, *x.shape).reshape(-1, *x.shape[1:])
            return -self.likelihood.nll(self.decode(flat, xs), xs).view(k, len(x))
        out = self.decode(flat)
        return -self.likelihood.nll(out.view(k, len(x), *out.shape[1:]), x)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
        """Latents on the straight lines from the posterior mean of each a[i] to that of
        b[i], the usual latent homotopy (Bowman et al. 2016): [pairs, steps, D]."""
        mu_a, mu_b = self.posterior(a).mean, self.posterior(b).mean
        t = torch.linspace(0, 1, steps, device=mu_a.device).view(1, -1, 1)
        return (1 - t) * mu_a.unsqueeze(1) + t * mu_b.unsqueeze(1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior mean: an image in [0, 1], or greedily decoded token ids."""
        return self.generate(self.posterior(x).mean)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
        """Images (likelihood mean) or token ids (greedy, or sampled at a temperature)."""
        if self.autoregressive:
            return self.decoder.generate(z, temperature)
        return self.likelihood.mean(self.decode(z))
