"""VAE = encoder + decoder + prior + divergence + likelihood, composed, nothing more."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vae_cli.divergences import Divergence
from vae_cli.likelihoods import Likelihood
from vae_cli.priors import Prior

# Argument validation in torch.distributions syncs with the device on every call and costs
# more than the maths at these sizes; inputs here are built by the model itself.
torch.distributions.Distribution.set_default_validate_args(False)

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32 and std > 0


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior,
                 divergence: Divergence, likelihood: Likelihood, latent_dim: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.prior, self.divergence, self.likelihood = prior, divergence, likelihood
        self.latent_dim = latent_dim

    def posterior(self, x: torch.Tensor) -> Distribution:
        mu, logvar = self.encoder(x).float().chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        return Independent(Normal(mu, std), 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, beta: float | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean loss = recon + beta * div, with every term for logging."""
        q = self.posterior(x)
        z = q.rsample()
        recon = self.likelihood.nll(self.decode(z), x).mean()
        terms = self.divergence(q, z, self.prior)
        b = self.divergence.beta if beta is None else beta
        return {"loss": recon + b * terms["div"], "recon": recon, **terms}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior mean, as an image in [0, 1]."""
        return self.likelihood.mean(self.decode(self.posterior(x).mean))

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decode(z))


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))
