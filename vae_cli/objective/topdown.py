"""Posterior and prior of a top-down hierarchy (model=vdvae): z = [z_1, ..., z_L].

q(z|x) = prod_l q(z_l | x, z_<l) and p(z) = prod_l p(z_l | z_<l), both formed along the
decoder's top-down pass (vae_cli.nets.vdvae). A pass that samples q also gives, at the same
z, every layer's log p and its KL(q_l || p_l) given the drawn z_<l; the decoder's output
for that z comes from the same pass. The pass is kept with its sample, so the objective's
log q(z|x), log p(z), KL and p(x|z) at that z cost one pass, not three. At any other z the
prior and the decoder run a pass of their own (z given), and q's density is unknown (as a
flow's, it is known at its own samples).

The KL that trains the model is VDVAE's: the sum over layers of the closed-form KL of two
Gaussians given the sampled z_<l (``divergence.estimator=mc`` takes log q - log p instead).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, register_kl

from vae_cli.nets.vdvae import Pass, TopDown, drew
from vae_cli.objective.parallel import Noise
from vae_cli.objective.posteriors import LatentDistribution, Posterior
from vae_cli.objective.priors import Prior, PriorDist


class Layered(Posterior):
    """q(z|x) for model=vdvae: reads the encoder's row of activations."""

    option = "gaussian with model=vdvae"
    closed_form = False
    layerwise_kl = True  # KL's estimator=auto sums the layers' closed forms

    def __init__(self, net: TopDown, bounds: tuple[float, float]):
        super().__init__(*bounds)
        self.__dict__["net"] = net  # the decoder's: saved there, once
        net.bounds = self.bounds

    def forward(self, h: torch.Tensor) -> Distribution:
        return LayeredPosterior(h, self)

    def terms(self, q: Distribution) -> dict[str, torch.Tensor]:
        """Each layer's KL, top first: the batch mean, logged as kl_1 ... kl_L."""
        last = q.last if isinstance(q, LayeredPosterior) else None
        if last is None or not last.kl:
            return {}
        return {f"kl_{i + 1}": kl.mean().detach() for i, kl in enumerate(last.kl)}


class LayeredPosterior(LatentDistribution):
    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, enc: torch.Tensor, family: Layered):
        net = family.net
        super().__init__(enc.shape[:1], torch.Size([net.latent_dim]), validate_args=False)
        self.enc, self.family, self.net = enc, family, net
        self.last: Pass | None = None
        self.means: Pass | None = None  # the pass at the means, kept for spread

    @property
    def device(self) -> torch.device:
        return self.enc.device

    def sample_pass(self, lead: tuple[int, ...], eps) -> torch.Tensor:  # noqa: ANN001
        """z drawn top-down with the standard normal draws ``eps(width)`` [k x B, width]."""
        k, b = math.prod(lead), len(self.enc)
        enc = self.enc if k == 1 else self.enc.repeat(k, 1)
        self.last = self.net.run(k * b, enc=enc, noise=eps)
        self.net.keep(self.last)
        return self.last.z.view(*lead, b, -1)

    def draw(self, noise: Noise, lead: tuple[int, ...], step: int | None) -> torch.Tensor:
        rows = math.prod(lead) * len(self.enc)
        return self.sample_pass(lead, lambda w: noise(torch.randn, w).reshape(rows, w))

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        lead = tuple(sample_shape)
        rows = math.prod(lead) * len(self.enc)
        return self.sample_pass(lead, lambda w: torch.randn(rows, w, device=self.device))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if self.last is None or not drew(self.last, z):
            raise ValueError("a top-down posterior's density is known only at the sample "
                             "it last drew")
        return sum(self.last.log_q).view(z.shape[:-1])

    @property
    def mode_point(self) -> torch.Tensor:
        """Each layer's posterior mean, given the means above it (one pass, kept)."""
        if self.means is None:
            self.sample_pass((), lambda w: torch.zeros(len(self.enc), w, device=self.device))
            self.means = self.last
        return self.means.z.view(len(self.enc), -1)

    @property
    def spread(self) -> torch.Tensor:
        """Each layer's posterior scales at the means above it: the mode's pass."""
        self.mode_point  # noqa: B018 - runs the pass at the means once
        return torch.cat(self.means.scale, 1)


class LayeredPrior(Prior):
    """p(z) = prod_l p(z_l | z_<l), the decoder's own top-down layers."""

    def __init__(self, family: Layered):
        super().__init__(family.net.latent_dim)
        self.__dict__["net"] = family.net

    def dist(self) -> Distribution:
        return PriorDist(self)

    def kl_closed_form(self) -> bool:
        return False

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, z.shape[-1])
        found = self.net.kept(z) or self.net.run(len(flat), given=flat)
        return sum(found.log_p).view(z.shape[:-1])

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        eps = lambda w: torch.randn(n, w, device=self.net.bias[0].device)  # noqa: E731
        found = self.net.run(n, noise=eps, temperature=temperature)
        self.net.keep(found)
        return found.z


@register_kl(LayeredPosterior, PriorDist)
def _layerwise_kl(q: LayeredPosterior, p: PriorDist) -> torch.Tensor:
    """VDVAE's KL at q's last sample: sum over layers of KL(q_l || p_l) given z_<l."""
    if not isinstance(p.prior, LayeredPrior):
        raise NotImplementedError
    if q.last is None or not q.last.kl:
        raise ValueError("the layers' KL is known after the posterior drew a sample")
    return sum(q.last.kl).view(-1, len(q.enc)).squeeze(0)

