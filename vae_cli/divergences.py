"""Divergences that pull q(z|x) towards p(z), weighted by beta in the objective.

Protocol: ``forward(q, z, prior)`` gets the posterior distribution, the sample z used for
the reconstruction and the prior module, and returns a dict of batch-mean scalars whose
"div" entry enters the loss; other entries are logged as extra metric columns.
``check(prior)`` runs at start-up and refuses impossible combinations with one line.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from vae_cli.errors import UserError
from vae_cli.priors import Prior

ESTIMATORS = ("auto", "analytic", "mc")


class Divergence(nn.Module):
    # True when recon + div is a negative ELBO (at beta = 1): enables nelbo/bits-per-dim.
    bounds_likelihood: bool = False

    def __init__(self, beta: float = 1.0):
        super().__init__()
        if beta < 0:
            raise UserError(f"divergence.beta={beta} must be >= 0")
        self.beta = float(beta)

    def check(self, prior: Prior) -> None:
        """Refuse a prior this divergence cannot handle (called once before training)."""

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _has_closed_form(q: Distribution, p: Distribution) -> bool:
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


class KL(Divergence):
    """KL(q(z|x) || p(z)): closed form when torch.distributions has one, else Monte Carlo.

    The Monte Carlo estimate log q(z|x) - log p(z) uses the same z as the reconstruction,
    so it is unbiased and costs no extra decoder pass.
    """

    bounds_likelihood = True

    def __init__(self, beta: float = 1.0, estimator: str = "auto"):
        super().__init__(beta)
        if estimator not in ESTIMATORS:
            raise UserError(f"divergence.estimator={estimator!r} is not one of {ESTIMATORS}")
        self.estimator = estimator
        self._analytic: bool | None = None

    def check(self, prior: Prior) -> None:
        z = torch.zeros(1, prior.latent_dim)
        probe = torch.distributions.Independent(torch.distributions.Normal(z, 1.0), 1)
        closed = _has_closed_form(probe, prior.dist())
        if self.estimator == "analytic" and not closed:
            raise UserError(f"divergence.estimator=analytic has no closed form against "
                            f"{type(prior).__name__}; use divergence.estimator=mc or auto")
        self._analytic = closed and self.estimator != "mc"

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        if self._analytic is None:
            self.check(prior)
        p = prior.dist()
        kl = kl_divergence(q, p) if self._analytic else q.log_prob(z) - p.log_prob(z)
        return {"div": kl.mean()}
