"""How the terms of a VAE combine into a number: the only place they do.

Per example the model gives log p(x|z) (likelihood), log p(z) (prior) and log q(z|x)
(posterior); the divergence gives its own estimate of how far q(z|x) is from p(z), and the
schedule how much it weighs at a training step. From these:

- the training and validation loss (``Objective``): recon + schedule(beta * div), or with
  ``iw_samples`` = k > 1 the importance-weighted bound (Burda et al. 2016) in which the
  weight w = schedule factor x beta scales log p(z) - log q(z|x) inside every importance
  weight: -log (1/k) sum_i p(x|z_i) (p(z_i)/q(z_i|x))^w. At k = 1 that is the weighted ELBO
  with a Monte Carlo KL. Options with no such form (capacity's |KL - C|, tc's three
  weights, free bits) are refused at start-up by rules.py, which judges every combination;
- the negative ELBO reported by evaluation, recon + KL whatever weight trained the model;
- the importance-weighted log-likelihood estimate (``log_weights``, k samples);
- the KL of each latent dimension (``kl_per_dim``).

A conditional model passes the batch's labels ``y`` wherever x goes: the same terms then
bound log p(x|y), the prior and the divergences seeing z alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vae_cli.objective.auxiliary import Auxiliary, Detached
from vae_cli.objective.divergences import Divergence
from vae_cli.objective.model import VAE
from vae_cli.objective.parallel import WHOLE, Shard
from vae_cli.objective.priors import mixture_parts
from vae_cli.objective.schedules import Constant, Schedule


class LogWeights(NamedTuple):
    """log p(x|z), log p(z), log q(z|x) for k samples z ~ q(z|x): each [k, B]."""

    px: torch.Tensor
    pz: torch.Tensor
    qz: torch.Tensor

    def total(self, w: float = 1.0) -> torch.Tensor:
        """log p(x|z) + w (log p(z) - log q(z|x)): w = 1 is log p(x, z) / q(z|x)."""
        return self.px + w * (self.pz - self.qz)


def log_weights(model: VAE, x: torch.Tensor, k: int, shard: Shard = WHOLE,
                y: torch.Tensor | None = None,
                log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
                q: Distribution | None = None) -> LogWeights:
    """``log_prior``: another log p(z) than the model's (a prior fitted after training);
    ``q``: q(z|x) when already computed (chunks of samples of the same batch)."""
    q = model.posterior(x, y) if q is None else q
    z = model.rsample(q, k, shard)
    pz = (log_prior or model.prior.log_prob)(z)
    return LogWeights(model.log_px(z, x, y), pz, q.log_prob(z))


class Objective(nn.Module):
    """The loss of a batch: model + divergence + schedule (+ k importance samples).

    ``forward`` returns the batch-mean terms (the "loss" entry is minimised, the others are
    logged) and the step's tensors, detached, for the auxiliary networks (a critic on z, a
    discriminator on x; None under the importance-weighted bound, which no component with
    such a network allows).
    ``y``: the batch's class labels, for a conditional model only.
    """

    def __init__(self, model: VAE, divergence: Divergence, schedule: Schedule | None = None,
                 iw_samples: int = 1):
        super().__init__()
        schedule = schedule or Constant()
        divergence.bind(model.prior, model.family)
        self.model, self.divergence = model, divergence
        self.schedule, self.iw_samples = schedule, iw_samples

    def forward(self, x: torch.Tensor, step: int | None = None, shard: Shard = WHOLE,
                y: torch.Tensor | None = None
                ) -> tuple[dict[str, torch.Tensor], Detached | None]:
        if self.iw_samples > 1:
            return self.iwae(x, self.iw_samples, step, shard, y)
        return self.elbo(x, step, shard, y)

    def elbo(self, x: torch.Tensor, step: int | None = None, shard: Shard = WHOLE,
             y: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], Detached]:
        model = self.model
        q = model.posterior(x, y)
        z = model.rsample(q, shard=shard, step=step if self.training else None)
        out = model.decode(z, x, y)
        recon = model.likelihood.nll(out, x).mean()
        terms = self.divergence(q, z, model.prior)
        div = self.schedule.term(terms["div"], self.divergence.weight(), step)
        own = model.family.terms(q)  # a family's own loss (VQ's codebook terms)
        loss = recon + div + own.pop("penalty", 0.0)
        # a loss's adversary on x (loss=perceptual's discriminator), in training only
        adv = model.likelihood.adversarial(out, recon, model.last_layer,
                                           step if self.training else None)
        if adv:
            loss = loss + adv.pop("adv")
        terms = {"loss": loss, "recon": recon, **terms, **own, **adv}
        return terms, Detached(x, z.detach(), out.detach(), model.prior)

    def iwae(self, x: torch.Tensor, k: int, step: int | None = None, shard: Shard = WHOLE,
             y: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], None]:
        lw = log_weights(self.model, x, k, shard, y)
        w = self.schedule.factor(step) * self.divergence.iw_weight()
        bound = torch.logsumexp(lw.total(w), dim=0) - math.log(k)
        terms = {"loss": -bound.mean(), "recon": -lw.px.mean(), "div": (lw.qz - lw.pz).mean()}
        return terms, None

    def auxiliaries(self) -> list[Auxiliary]:
        """The networks it trains for itself (objective/auxiliary.py), in a fixed order."""
        return [a for a in (self.divergence, self.model.likelihood) if a.auxiliary_steps]

    def main_parameters(self) -> list[nn.Parameter]:
        """What the main optimizer steps: everything but the auxiliary networks."""
        own = {id(p) for a in self.auxiliaries() for p in a.auxiliary_parameters()}
        return [p for p in self.parameters() if id(p) not in own]


def negative_elbo(recon: float, terms: dict[str, float]) -> float:
    """recon + KL: the divergence's "kl" entry where it reports one apart from the weighted
    "div" (free bits, tc), else "div". Meaningful when the divergence bounds_likelihood."""
    return recon + terms.get("kl", terms["div"])


def prior_marginals(prior: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log p(z_d) per dimension, [..., D]: exact for diagonal Gaussians and for mixtures of
    them (each marginal is a 1-D mixture with the same weights)."""
    if isinstance(prior, Independent) and isinstance(prior.base_dist, Normal):
        return prior.base_dist.log_prob(z)
    parts = mixture_parts(prior)
    if parts is not None:
        log_pi, loc, scale = parts  # [K], [K, D], [K, D]
        per = Normal(loc, scale, validate_args=False).log_prob(z.unsqueeze(-2))
        return torch.logsumexp(per + log_pi.unsqueeze(-1), dim=-2)
    raise TypeError(f"no per-dimension marginals for {type(prior).__name__}")


def kl_per_dim(mu: torch.Tensor, std: torch.Tensor, prior: Distribution,
               mc_samples: int = 16) -> torch.Tensor:
    """KL(q(z_d|x) || p(z_d)) for each example and dimension, [B, D]: analytic against a
    diagonal Gaussian prior, else a Monte Carlo estimate against the prior's 1-D marginals
    (then the dimensions need not sum to the total KL, the prior not being factorised)."""
    q = Normal(mu, std, validate_args=False)
    if isinstance(prior, Independent) and isinstance(prior.base_dist, Normal):
        return torch.distributions.kl_divergence(q, prior.base_dist)
    z = q.sample((mc_samples,))
    return (q.log_prob(z) - prior_marginals(prior, z)).mean(0)
