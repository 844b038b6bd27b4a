"""Priors p(z): small modules that hand out a torch.distributions object.

Protocol: ``dist()`` returns a distribution with event shape [latent_dim]; ``sample(n)``
and ``log_prob(z)`` follow from it, so any divergence meets any prior. Learned priors are
trained with the model through whatever the divergence evaluates (log p(z) for KL,
reparameterised samples where the distribution has them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    kl_divergence,
)

from vae_cli.errors import UserError


def diagonal_normal(loc: torch.Tensor, scale: torch.Tensor) -> Independent:
    """N(loc, diag(scale^2)) over the last dimension. validate_args=False: the checks sync
    with the device on every call and cost more than the maths at these sizes, and every
    caller builds the parameters itself."""
    return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


class Prior(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def dist(self) -> Distribution:
        raise NotImplementedError

    def kl_closed_form(self) -> bool:
        """Whether torch.distributions knows KL(diagonal Gaussian || this prior) in closed
        form (asked before the prior is bound to a model). A diagonal Gaussian is answered
        without the probe, whose operations a build would otherwise do every time."""
        d, p = self.latent_dim, self.dist()
        if isinstance(p, Independent) and type(p.base_dist) is Normal:
            return True
        try:
            kl_divergence(diagonal_normal(torch.zeros(1, d), torch.ones(1, d)), p)
        except NotImplementedError:
            return False
        return True

    def kl(self, q: Distribution) -> torch.Tensor:
        """KL(q || p) per example, in closed form (kl_closed_form)."""
        return kl_divergence(q, self.dist())

    def bind(self, posterior: Callable[..., Distribution]) -> None:
        """Called once by the VAE with its posterior q(z|x) (q(z|x, y) for a conditional
        model); only the VampPrior needs it."""

    def attach(self, family: nn.Module) -> None:
        """Called once by the VAE with its posterior family; only a prior over a discrete
        family's codes needs it (rules.py pairs the two)."""

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """Reparameterised where possible, so sample-based divergences train the prior too:
        a mixture draws component indices, then rsamples the chosen components (gradients
        reach means, scales and VampPrior pseudo-inputs; not the mixture weights).
        ``temperature`` t scales every Gaussian's standard deviation (t = 0: the means)."""
        d = self.dist() if temperature == 1 else tempered(self.dist(), temperature)
        if d.has_rsample:
            return d.rsample((n,))
        if isinstance(d, MixtureSameFamily):
            k = d.mixture_distribution.sample((n,))
            return d.component_distribution.rsample((n,))[torch.arange(n, device=k.device), k]
        return d.sample((n,))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.dist().log_prob(z)

    def frozen_log_prob(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """log p(z) with the prior's parameters computed once (a VampPrior's pass over its
        pseudo-inputs), for scoring many z under fixed weights (see fixed_density)."""
        return fixed_density(self.dist())

    @property
    def top_dims(self) -> list[int]:
        """The dimensions of z a traversal moves (a two-level prior: those of its top)."""
        return list(range(self.latent_dim))

    def settle(self, z: torch.Tensor) -> torch.Tensor:
        """z made consistent after some dimensions were moved (identity for one layer)."""
        return z


def tempered(d: Distribution, t: float) -> Distribution:
    """A diagonal Gaussian, or a mixture of them, with its standard deviations times t."""
    if isinstance(d, Independent) and type(d.base_dist) is Normal:
        return diagonal_normal(d.base_dist.loc, d.base_dist.scale * t)
    parts = mixture_parts(d)
    if parts is None:
        raise UserError(f"temperature={t} scales a Gaussian prior's standard deviations; "
                        f"this model's p(z) ({type(d).__name__}) has none: leave "
                        "temperature=1")
    log_w, loc, scale = parts
    return _mixture(log_w, loc, scale * t)


def fixed_density(prior: Distribution) -> Callable[[torch.Tensor], torch.Tensor]:
    """log p(z) under fixed parameters, for a loop that scores many z (the IWAE bound). A
    mixture of diagonal Gaussians (VampPrior, mog) is scored by two matrix products in
    float64 instead of torch's [N, K, D] broadcast:
    sum_d (z_d - m_kd)^2 / s_kd^2 = z^2 . (1/s_k^2) - 2 z . (m_k/s_k^2) + sum_d m_kd^2/s_kd^2.
    A VampPrior with K = 500 made the prior, not the decoder, most of a CPU's bound at
    k = 5000; float64 keeps the expansion's cancellation far below the estimate's noise."""
    parts = mixture_parts(prior)
    if parts is None:
        return prior.log_prob
    log_w, loc, scale = (t.double() for t in parts)
    inv = scale.pow(-2)  # [K, D]
    const = log_w - scale.log().sum(-1) - 0.5 * (loc.square() * inv).sum(-1) \
        - 0.5 * loc.shape[-1] * math.log(2 * math.pi)

    def log_prob(z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, z.shape[-1]).double()
        quad = flat.square() @ inv.T - 2 * flat @ (loc * inv).T  # [N, K]
        out = torch.logsumexp(const - 0.5 * quad, dim=-1)
        return out.view(z.shape[:-1]).to(z.dtype)

    return log_prob


class PriorDist(Distribution):
    """A prior known by its log_prob and sample alone (a hierarchy's, formed layer by
    layer) as a torch Distribution: no closed-form KL against anything but what a model
    registers for its own posterior."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, prior: Prior):
        super().__init__(torch.Size(), torch.Size([prior.latent_dim]), validate_args=False)
        self.prior = prior

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(z)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        n = int(torch.Size(sample_shape).numel())
        return self.prior.sample(n).view(*sample_shape, self.prior.latent_dim)


class NormalPrior(Prior):
    """Standard normal N(0, I)."""

    def __init__(self, *, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers so that .to(device) moves them and no parameter is trained.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def dist(self) -> Distribution:
        return diagonal_normal(self.loc, self.scale)

    def kl(self, q: Distribution) -> torch.Tensor:
        """KL(N(mu, diag(s^2)) || N(0, I)) = sum_d (mu^2 + s^2 - 1) / 2 - log s, written out:
        the most common KL in training, without building p or torch's generic pair formula
        (fewer operations: on a GPU the small models' step is launch-bound)."""
        if not (isinstance(q, Independent) and type(q.base_dist) is Normal):
            return super().kl(q)
        mu, s = q.base_dist.loc, q.base_dist.scale
        return (0.5 * (mu.square() + s.square() - 1) - s.log()).sum(-1)


class LearnedPrior(Prior):
    """Diagonal Gaussian with trainable mean and log-variance (starts at N(0, I))."""

    def __init__(self, *, latent_dim: int):
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.logvar = nn.Parameter(torch.zeros(latent_dim))

    def dist(self) -> Distribution:
        return diagonal_normal(self.loc, torch.exp(0.5 * self.logvar))


def _mixture(logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> Distribution:
    return MixtureSameFamily(Categorical(logits=logits, validate_args=False),
                             diagonal_normal(loc, scale), validate_args=False)


def mixture_parts(prior: Distribution) -> tuple[torch.Tensor, ...] | None:
    """(log weights [K], means [K, D], scales [K, D]) of a mixture of diagonal Gaussians."""
    if not isinstance(prior, MixtureSameFamily):
        return None
    comp = prior.component_distribution
    if not (isinstance(comp, Independent) and type(comp.base_dist) is Normal
            and comp.base_dist.loc.dim() == 2):
        return None
    log_w = torch.log_softmax(prior.mixture_distribution.logits, -1)
    return log_w, comp.base_dist.loc, comp.base_dist.scale


class MixturePrior(Prior):
    """Mixture of K diagonal Gaussians with trainable weights, means and variances.

    Means start spread as N(0, init_spread^2) so components do not collapse onto each other.
    """

    def __init__(self, components: int = 10, init_spread: float = 1.0, *, latent_dim: int):
        super().__init__(latent_dim)
        if components < 1:
            raise UserError(f"prior.components={components} must be >= 1")
        g = torch.Generator().manual_seed(0)  # the init must not consume the training RNG
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(init_spread * torch.randn(components, latent_dim, generator=g))
        self.logvar = nn.Parameter(torch.zeros(components, latent_dim))

    def dist(self) -> Distribution:
        return _mixture(self.logits, self.loc, torch.exp(0.5 * self.logvar))


class VampPrior(Prior):
    """VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q(z | u_k) with K trainable
    pseudo-inputs u_k in data space, passed through a hardtanh to stay in [0, 1]. For a
    sequence encoder they are embedded sequences [L, E] (``bounded=False``): token ids are
    discrete, and a soft distribution over the vocabulary per position would cost L x V
    parameters per component.

    With a conditional encoder q(z|x, y) (``num_classes`` > 0) each pseudo-input also
    carries a learned soft label c_k = softmax(logits_k): p(z) = (1/K) sum_k q(z | u_k, c_k)
    stays one unconditional prior, so every class decodes from the same p(z). Pseudo-input
    k starts mostly of class k mod C (the encoder was trained on one-hot labels, not on
    uniform mixtures), and gradients move its label like its pixels."""

    LABEL_LOGIT = 3.0  # initial logit of a pseudo-input's own class, 0 for the others

    def __init__(self, components: int = 500, init_mean: float = 0.05, init_std: float = 0.01,
                 *, latent_dim: int, shape: tuple[int, ...], bounded: bool = True,
                 num_classes: int | None = None):
        super().__init__(latent_dim)
        self.bounded = bounded
        if components < 1:
            raise UserError(f"prior.components={components} must be >= 1")
        g = torch.Generator().manual_seed(0)
        self.pseudo = nn.Parameter(init_mean + init_std * torch.randn(components, *shape,
                                                                      generator=g))
        logits = None
        if num_classes:
            own = torch.arange(components) % num_classes
            logits = nn.Parameter(self.LABEL_LOGIT * F.one_hot(own, num_classes).float())
        self.register_parameter("label_logits", logits)  # None: nothing saved or trained
        self._posterior: Callable[..., Distribution] | None = None

    def bind(self, posterior: Callable[..., Distribution]) -> None:
        # Kept outside the module tree: the encoder already belongs to the VAE.
        self.__dict__["_posterior"] = posterior

    def pseudo_inputs(self) -> torch.Tensor:
        return F.hardtanh(self.pseudo, 0.0, 1.0) if self.bounded else self.pseudo

    def soft_labels(self) -> torch.Tensor | None:
        """The pseudo-inputs' class probabilities [K, C] (None for an unconditional encoder)."""
        return None if self.label_logits is None else torch.softmax(self.label_logits, -1)

    def kl_closed_form(self) -> bool:
        return False  # a mixture of the encoder's posteriors, known once bound to it

    def dist(self) -> Distribution:
        if self._posterior is None:
            raise RuntimeError("VampPrior used before bind(encoder)")
        labels = self.soft_labels()
        q = (self._posterior(self.pseudo_inputs()) if labels is None
             else self._posterior(self.pseudo_inputs(), labels))  # Independent(Normal), [K]
        k = self.pseudo.shape[0]
        logits = torch.full((k,), -math.log(k), device=self.pseudo.device)
        return _mixture(logits, q.base_dist.loc, q.base_dist.scale)
