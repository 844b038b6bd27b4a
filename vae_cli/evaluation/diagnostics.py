"""Posterior diagnostics and the importance-weighted likelihood estimate.

All functions take a model and uint8 images on the model's device, loop in batches, and
return plain floats/lists (one host sync at the end where possible).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Independent, MixtureSameFamily, Normal

from vae_cli.data.batching import ordered
from vae_cli.objective.model import VAE, per_unit

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: Cov_x(E[z_u|x]) > 0.01


@torch.no_grad()
def iwae_bound(model: VAE, x: torch.Tensor, k: int, batch_size: int,
               max_decoded: int = 20000) -> dict[str, float]:
    """log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x) (Burda et al. 2016).

    Samples are drawn in chunks so that at most ``max_decoded`` images go through the
    decoder at once; a running logsumexp merges the chunks. The ELBO is averaged over the
    same samples, so iwae >= elbo holds exactly (Jensen), not just in expectation.
    """
    was_training = model.training
    model.eval()
    iw_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    elbo_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for xb in ordered(x, batch_size):
        chunk = max(1, min(k, max_decoded // len(xb)))
        acc = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        mean_log_w = torch.zeros(len(xb), dtype=torch.float64, device=x.device)
        done = 0
        while done < k:
            c = min(chunk, k - done)
            log_px, log_pz, log_qz = model.log_weights(xb, c)
            log_w = (log_px + log_pz - log_qz).double()
            acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
            mean_log_w += log_w.sum(0)
            done += c
        iw_sum += (acc - math.log(k)).sum()
        elbo_sum += (mean_log_w / k).sum()
    model.train(was_training)
    n = len(x)
    iw, elbo = (iw_sum / n).item(), (elbo_sum / n).item()
    return {"iw_samples": k, "nll_iwae": -iw, "nelbo_iw": -elbo,
            **per_unit(-iw, x, "_iwae")}


@torch.no_grad()
def encode_all(model: VAE, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Posterior means and standard deviations of every example: [N, D] each."""
    mus, stds = [], []
    for xb in ordered(x, batch_size):
        q = model.posterior(xb)
        mus.append(q.base_dist.loc)
        stds.append(q.base_dist.scale)
    return torch.cat(mus), torch.cat(stds)


def prior_marginals(prior_dist, z: torch.Tensor) -> torch.Tensor:
    """log p(z_d) per dimension, [..., D]: exact for diagonal Gaussians and for mixtures of
    them (each marginal is a 1-D mixture with the same weights)."""
    if isinstance(prior_dist, Independent) and isinstance(prior_dist.base_dist, Normal):
        return prior_dist.base_dist.log_prob(z)
    if isinstance(prior_dist, MixtureSameFamily):
        comp = prior_dist.component_distribution.base_dist  # Normal, batch [K, D]
        log_pi = torch.log_softmax(prior_dist.mixture_distribution.logits, -1)  # [K]
        per = Normal(comp.loc, comp.scale).log_prob(z.unsqueeze(-2))  # [..., K, D]
        return torch.logsumexp(per + log_pi.unsqueeze(-1), dim=-2)
    raise TypeError(f"no per-dimension marginals for {type(prior_dist).__name__}")


@torch.no_grad()
def posterior_stats(model: VAE, x: torch.Tensor, batch_size: int, mc_samples: int = 16,
                    encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """KL per latent dimension, active units, and the aggregate posterior against the prior.

    Per-dimension KL is KL(q(z_d|x) || p(z_d)) averaged over x: analytic for a diagonal
    Gaussian prior, a Monte Carlo estimate against the prior's 1-D marginals otherwise
    (then the dimensions need not sum to the total KL, the prior not being factorised).
    ``encoded`` passes (mu, std) from encode_all when the caller needs them too.
    """
    mu, std = encoded if encoded is not None else encode_all(model, x, batch_size)
    p = model.prior.dist()
    kl_sum = torch.zeros(mu.shape[1], dtype=torch.float64, device=mu.device)
    for i in range(0, len(mu), batch_size):
        q = Normal(mu[i:i + batch_size], std[i:i + batch_size])
        if isinstance(p, Independent) and isinstance(p.base_dist, Normal):
            kl = torch.distributions.kl_divergence(q, p.base_dist)
        else:
            z = q.sample((mc_samples,))
            kl = (q.log_prob(z) - prior_marginals(p, z)).mean(0)
        kl_sum += kl.double().sum(0)
    kl_per_dim = (kl_sum / len(mu)).tolist()
    activity = mu.double().var(0, unbiased=True)
    agg_mean = mu.double().mean(0)
    agg_var = activity + std.double().pow(2).mean(0)  # law of total variance
    zp = model.prior.sample(max(len(mu), 1000)).double()
    return {
        "kl_per_dim": kl_per_dim,
        "active_units": int((activity > ACTIVE_THRESHOLD).sum().item()),
        "activity": activity.tolist(),
        "aggregate_mean": agg_mean.tolist(), "aggregate_var": agg_var.tolist(),
        "prior_mean": zp.mean(0).tolist(), "prior_var": zp.var(0).tolist(),
    }
