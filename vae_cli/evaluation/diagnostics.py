"""Posterior diagnostics: per-dimension KL, active units, the aggregate posterior.

All functions take a model and data on the model's device, loop in batches, and return
plain floats/lists (one host sync at the end where possible).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vae_cli.data.batching import labelled
from vae_cli.objective import bounds
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import mean_of, scale_of

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: Cov_x(E[z_u|x]) > 0.01


@torch.no_grad()
def encode_all(model: VAE, x: torch.Tensor, batch_size: int,
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Posterior means and standard deviations of every example (given its label, for a
    conditional model): [N, D] each. For a flow posterior: its base mean pushed through the
    flow, and the base Gaussian's standard deviations."""
    mus, stds = [], []
    for xb, yb in labelled(x, labels, batch_size):
        q = model.posterior(xb, yb)
        mus.append(mean_of(q))
        stds.append(scale_of(q))
    return torch.cat(mus), torch.cat(stds)


def mean_encoder(model: VAE, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Observations (on any device) -> posterior means on the model's device, in batches:
    the representation the disentanglement metrics score."""
    device = next(model.parameters()).device
    return lambda x: encode_all(model, x.to(device), batch_size)[0]


@torch.no_grad()
def posterior_stats(model: VAE, x: torch.Tensor, batch_size: int, mc_samples: int = 16,
                    encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
                    labels: torch.Tensor | None = None) -> dict:
    """KL per latent dimension, active units, and the aggregate posterior against the prior.

    Per-dimension KL is KL(q(z_d|x) || p(z_d)) averaged over x (see bounds.kl_per_dim);
    a flow posterior has no per-dimension marginals (None), and its aggregate variance is
    that of one sample z ~ q(z|x) per example. ``encoded`` passes (mu, std) from encode_all
    when the caller needs them too.
    """
    mu, std = encoded if encoded is not None else encode_all(model, x, batch_size, labels)
    activity = mu.double().var(0, unbiased=len(mu) > 1)  # one example: no spread
    agg_mean = mu.double().mean(0)
    if model.family.closed_form:
        kl_per_dim = _kl_per_dim(mu, std, model.prior.dist(), batch_size, mc_samples)
        agg_var = activity + std.double().pow(2).mean(0)  # law of total variance
    else:
        kl_per_dim = None
        z = torch.cat([model.rsample(model.posterior(xb, yb))
                       for xb, yb in labelled(x, labels, batch_size)]).double()
        agg_mean, agg_var = z.mean(0), z.var(0, unbiased=len(z) > 1)
    zp = model.prior.sample(max(len(mu), 1000)).double()
    return {
        "kl_per_dim": kl_per_dim,
        "active_units": int((activity > ACTIVE_THRESHOLD).sum().item()),
        "activity": activity.tolist(),
        "aggregate_mean": agg_mean.tolist(), "aggregate_var": agg_var.tolist(),
        "prior_mean": zp.mean(0).tolist(), "prior_var": zp.var(0).tolist(),
    }


def _kl_per_dim(mu: torch.Tensor, std: torch.Tensor, p: torch.distributions.Distribution,
                batch_size: int, mc_samples: int) -> list[float]:
    kl_sum = torch.zeros(mu.shape[1], dtype=torch.float64, device=mu.device)
    for i in range(0, len(mu), batch_size):
        kl = bounds.kl_per_dim(mu[i:i + batch_size], std[i:i + batch_size], p, mc_samples)
        kl_sum += kl.double().sum(0)
    return (kl_sum / len(mu)).tolist()
