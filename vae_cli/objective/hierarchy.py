"""Posterior and prior of a two-level VAE (model=hvae): z = [z1, z2].

q(z|x) = q(z2|x) q(z1|x, z2) is sampled top-down, z2 first; log q(z|x) is the sum of the two
Gaussian log-densities at the drawn sample (like a flow's, known at its own samples: q(z1|x,
z2) needs the z2 that was drawn). p(z) = p(z2) p(z1|z2), p(z2) the configured prior (a
VampPrior's components are q(z2|u_k)). The KL is therefore Monte Carlo, the IWAE bound works
as for one layer, and what needs q or p per dimension is refused as for flows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions import Distribution, Independent

from vae_cli.objective.posteriors import Posterior, PushedGaussian, bounded_gaussian
from vae_cli.objective.priors import Prior, PriorDist, tempered


class TwoLevel(Posterior):
    """q(z1, z2|x) for model=hvae; the encoder gives q(z2|x) and the x-branch, ``hierarchy``
    the layers reading z2. Log-variances bounded like the Gaussian family's."""

    option = "gaussian with model=hvae"
    closed_form = False

    def __init__(self, hierarchy: torch.nn.Module, bounds: tuple[float, float]):
        super().__init__(*bounds)
        self.hierarchy = hierarchy

    def forward(self, h: torch.Tensor) -> Distribution:
        d2 = self.hierarchy.top_dim
        return TwoLevelPosterior(self.gaussian(h, d2), h[..., 2 * d2:], self)


class TwoLevelPosterior(PushedGaussian):
    """base: q(z2|x); ``push(z2)`` draws z1 ~ q(z1|x, z2) and returns [z1, z2]."""

    def __init__(self, top: Independent, hx: torch.Tensor, family: TwoLevel):
        super().__init__(top, [])
        self.hx, self.family = hx, family
        d = family.hierarchy.latent_dim + family.hierarchy.top_dim
        self._event_shape = torch.Size([d])

    def lower(self, z2: torch.Tensor) -> Independent:
        return bounded_gaussian(self.family.hierarchy.posterior_z1(self.hx, z2), self.family.bounds)

    def push(self, z2: torch.Tensor) -> torch.Tensor:
        q1 = self.lower(z2)
        z1 = q1.rsample()
        z = torch.cat([z1, z2], dim=-1)
        self._last = (z, self.base.log_prob(z2) + q1.log_prob(z1))
        return z

    @property
    def mode_point(self) -> torch.Tensor:
        z2 = self.base.base_dist.loc
        return torch.cat([self.lower(z2).base_dist.loc, z2], dim=-1)

    @property
    def spread(self) -> torch.Tensor:
        z2 = self.base.base_dist.loc
        return torch.cat([self.lower(z2).base_dist.scale, self.base.base_dist.scale], dim=-1)


class TwoLevelPrior(Prior):
    """p(z1, z2) = p(z1|z2) p(z2): ``top`` is the configured prior over z2; the layers of
    p(z1|z2) belong to the model's posterior family (kept out of this module's tree, so they
    are saved once)."""

    def __init__(self, top: Prior, family: TwoLevel):
        super().__init__(family.hierarchy.latent_dim + family.hierarchy.top_dim)
        self.top = top
        self.__dict__["_family"] = family

    @property
    def hierarchy(self) -> torch.nn.Module:
        return self._family.hierarchy

    def bind(self, posterior: Callable[..., Distribution]) -> None:
        # a VampPrior on z2 mixes the top posteriors q(z2|u_k)
        self.top.bind(lambda x, y=None: posterior(x, y).base)

    def conditional(self, z2: torch.Tensor) -> Independent:
        return bounded_gaussian(self.hierarchy.prior_z1(z2), self._family.bounds)

    def dist(self) -> Distribution:
        return PriorDist(self)  # no closed-form KL against anything: Monte Carlo

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        d1 = self.hierarchy.latent_dim
        return self.top.log_prob(z[..., d1:]) + self.conditional(z[..., d1:]).log_prob(
            z[..., :d1])

    def frozen_log_prob(self) -> Callable[[torch.Tensor], torch.Tensor]:
        top, d1 = self.top.frozen_log_prob(), self.hierarchy.latent_dim
        return lambda z: top(z[..., d1:]) + self.conditional(z[..., d1:]).log_prob(z[..., :d1])

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Each layer's draw at the temperature (as VDVAE tempers every layer)."""
        z2 = self.top.sample(n, temperature)
        z1 = self.conditional(z2)
        if temperature != 1:
            z1 = tempered(z1, temperature)
        return torch.cat([z1.rsample(), z2], dim=-1)

    @property
    def top_dims(self) -> list[int]:
        return list(range(self.hierarchy.latent_dim, self.latent_dim))

    def settle(self, z: torch.Tensor) -> torch.Tensor:
        """z with z1 replaced by the mean of p(z1|z2): how a changed top layer is decoded."""
        d1 = self.hierarchy.latent_dim
        return torch.cat([self.conditional(z[..., d1:]).base_dist.loc, z[..., d1:]], dim=-1)

