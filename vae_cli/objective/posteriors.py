"""Posterior families q(z|x): how the encoder's output becomes a distribution over z.

The encoder emits ``outputs(latent_dim)`` numbers per example. Every family starts from a
diagonal Gaussian N(mu, diag(exp(logvar))) (its first 2 x latent_dim numbers), the
log-variance bounded by a hardtanh (the VampPrior paper bounds it to [-6, 2]; the default
bounds only keep exp(logvar) finite in float32 and the standard deviation above zero).
``gaussian`` stops there (Kingma & Welling 2014). The flows push a Gaussian sample z0
through K invertible steps, z = f_K(...f_1(z0)), so that
log q(z|x) = log N(z0) - sum_k log |det df_k/dz|:

- ``planar`` (Rezende & Mohamed 2015): f(z) = z + u tanh(w.z + b), u constrained so that
  w.u >= -1 (invertible); u, w, b of each step come from the encoder (amortised);
- ``radial`` (Rezende & Mohamed 2015): f(z) = z + beta (z - z_ref) / (alpha + |z - z_ref|),
  alpha > 0 and beta >= -alpha; z_ref, alpha, beta amortised;
- ``iaf`` (Kingma et al. 2016): autoregressive steps z = s * z + (1 - s) * m with
  (m, log s) from a MADE network that reads z and a context vector h(x) from the encoder;
  the order of the dimensions is reversed between steps.

A flow's density is known at its own samples only (planar and IAF steps have no closed-form
inverse): ``log_prob`` answers for the sample the posterior last drew, which is every place
the objective asks (KL by Monte Carlo, the importance-weighted bound), and refuses any other
point. Options that need q(z|x) elsewhere (a VampPrior, whose prior is made of posteriors;
beta-TCVAE's q(z_i|x_j) for all pairs; the analytic per-dimension KL) are refused with
those families at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vae_cli.errors import UserError
from vae_cli.objective.parallel import AllSum, Noise
from vae_cli.objective.priors import diagonal_normal


class Posterior(nn.Module):
    """q(z|x) from the encoder's output h [B, outputs(latent_dim)] (a spatial family:
    the encoder's feature map [B, outputs(latent_dim), H, W])."""

    option = "gaussian"  # its name in the posterior group, for messages
    closed_form = True  # a diagonal Gaussian: analytic KLs, densities anywhere
    discrete = False  # codes from a finite set: prior=uniform, divergence=kl only
    spatial = False  # reads the encoder's feature map, not a flat vector
    deterministic = False  # q(z|x) a point mass (VQ): one importance sample says all

    def __init__(self, logvar_min: float = -30.0, logvar_max: float = 20.0):
        super().__init__()
        if not -80.0 <= logvar_min < logvar_max <= 80.0:
            raise UserError(f"posterior.logvar_min={logvar_min} and logvar_max={logvar_max} "
                            "must satisfy -80 <= min < max <= 80 (exp(logvar) in float32)")
        self.bounds = (float(logvar_min), float(logvar_max))

    def outputs(self, latent_dim: int) -> int:
        return 2 * latent_dim

    def gaussian(self, h: torch.Tensor, latent_dim: int) -> Independent:
        return bounded_gaussian(h[..., : 2 * latent_dim], self.bounds)

    def forward(self, h: torch.Tensor) -> Distribution:
        raise NotImplementedError

    def terms(self, q: Distribution) -> dict[str, torch.Tensor]:
        """Batch scalars of the family's own: logged, and a "penalty" entry added to the
        loss (VQ's codebook and commitment terms); none for most families."""
        return {}

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """z made a latent the decoder was trained on (VQ: the nearest codes)."""
        return z

    def distribute(self, all_sum: AllSum) -> None:
        """Under data parallelism: how to sum a tensor over ranks, for statistics of the
        global batch that a family keeps (VQ's moving averages)."""


def bounded_gaussian(params: torch.Tensor, bounds: tuple[float, float]) -> Independent:
    """N(mu, diag(exp(logvar))) from params [..., 2D] = (mu, logvar), logvar clamped."""
    mu, logvar = params.float().chunk(2, dim=-1)
    return diagonal_normal(mu, torch.exp(0.5 * logvar.clamp(*bounds)))


class DiagonalGaussian(Posterior):
    """N(mu, diag(exp(logvar))) with logvar clamped to [logvar_min, logvar_max] (a hardtanh:
    no gradient pushes it further out)."""

    def forward(self, h: torch.Tensor) -> Distribution:
        return self.gaussian(h, h.shape[-1] // 2)


class LatentDistribution(Distribution):
    """A posterior that is not a plain diagonal Gaussian. ``draw`` makes z from shared
    noise (``step``: the training step, None outside training); ``mode_point`` is the point
    that stands for q(z|x); ``spread`` per-dimension standard deviations."""

    def draw(self, noise: Noise, lead: tuple[int, ...], step: int | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def mode_point(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def spread(self) -> torch.Tensor:
        raise NotImplementedError


class PushedGaussian(LatentDistribution):
    """A Gaussian pushed through a map, so its density is known only at its own samples:
    z = f_K(...f_1(z0)), z0 ~ ``base``; ``steps`` map z [..., B, D] to (z', log|det|
    [..., B]) (a flow's steps; model=hvae's layer z1 drawn given z2). The log-density is
    cached for the last sample drawn."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base: Independent, steps: list):
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)
        self.base, self.steps = base, steps
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def push(self, z0: torch.Tensor) -> torch.Tensor:
        """The flow applied to base samples z0; remembers log q of the result."""
        z, log_det = z0, torch.zeros(z0.shape[:-1], device=z0.device)
        for step in self.steps:
            z, ld = step(z)
            log_det = log_det + ld
        self._last = (z, self.base.log_prob(z0) - log_det)
        return z

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        return self.push(self.base.rsample(sample_shape))

    @property
    def device(self) -> torch.device:
        return self.base.base_dist.loc.device

    def draw(self, noise: Noise, lead: tuple[int, ...], step: int | None) -> torch.Tensor:
        base = self.base.base_dist
        return self.push(base.loc + base.scale * noise(torch.randn, base.loc.shape[-1]))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if self._last is None or z is not self._last[0]:
            raise ValueError("a flow posterior's density is known only at the sample it "
                             "last drew")
        return self._last[1]

    @property
    def spread(self) -> torch.Tensor:
        """Standard deviations that stand for q's spread: the base Gaussian's."""
        return self.base.base_dist.scale

    @property
    def mode_point(self) -> torch.Tensor:
        """The base mean pushed through the flow: the point vae shows and encodes as
        'the posterior mean' (the true mean of a flow has no closed form)."""
        z = self.push(self.base.base_dist.loc)
        self._last = None  # not a sample: no density claims about it
        return z


def base_of(q: Distribution) -> Normal:
    """The diagonal Gaussian a posterior starts from: loc and scale [B, D]."""
    return (q.base if isinstance(q, PushedGaussian) else q).base_dist


def scale_of(q: Distribution) -> torch.Tensor:
    """Per-dimension standard deviations of q (a flow's: its base Gaussian's)."""
    return q.spread if isinstance(q, LatentDistribution) else q.base_dist.scale


def mean_of(q: Distribution) -> torch.Tensor:
    """The point that stands for q(z|x): its mean (a flow: its base mean pushed through;
    a categorical: its mode; VQ: the encoder's map before quantisation)."""
    return q.mode_point if isinstance(q, LatentDistribution) else q.base_dist.loc


class Flow(Posterior):
    """A Gaussian pushed through ``steps`` flow steps; subclasses build one step."""

    closed_form = False

    def __init__(self, steps: int = 4, logvar_min: float = -30.0, logvar_max: float = 20.0):
        super().__init__(logvar_min, logvar_max)
        if steps < 1:
            raise UserError(f"posterior.steps={steps} must be >= 1")
        self.n_steps = steps

    def outputs(self, latent_dim: int) -> int:
        return 2 * latent_dim + self.extra(latent_dim)

    def extra(self, latent_dim: int) -> int:
        raise NotImplementedError

    def latent(self, h: torch.Tensor) -> int:
        """latent_dim from the encoder's output width (outputs() is linear in it)."""
        per = self.outputs(1) - self.outputs(0)
        return (h.shape[-1] - self.outputs(0)) // per

    def forward(self, h: torch.Tensor) -> Distribution:
        d = self.latent(h)
        base = self.gaussian(h, d)
        return PushedGaussian(base, self.build(h[..., 2 * d:].float(), d))

    def build(self, params: torch.Tensor, d: int) -> list:
        raise NotImplementedError


class Planar(Flow):
    """Planar steps f(z) = z + u' tanh(w.z + b), u' = u + (m(w.u) - w.u) w / |w|^2 with
    m(a) = -1 + softplus(a), so w.u' >= -1 and f is invertible (Rezende & Mohamed, app. A).
    log|det| = log|1 + u'.psi|, psi = (1 - tanh^2(w.z + b)) w."""

    option = "planar"

    def extra(self, latent_dim: int) -> int:
        return self.n_steps * (2 * latent_dim + 1)

    def build(self, params: torch.Tensor, d: int) -> list:
        steps = []
        for p in params.split(2 * d + 1, dim=-1):
            u, w, b = p[..., :d], p[..., d:2 * d], p[..., 2 * d]
            wu = (w * u).sum(-1, keepdim=True)
            u = u + (F.softplus(wu) - 1 - wu) * w / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-8)
            steps.append(lambda z, u=u, w=w, b=b: planar_step(z, u, w, b))
        return steps


def planar_step(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tanh((z * w).sum(-1) + b)
    psi_u = (1 - a.pow(2)) * (w * u).sum(-1)
    return z + u * a.unsqueeze(-1), torch.log((1 + psi_u).abs() + 1e-8)


class Radial(Flow):
    """Radial steps f(z) = z + beta h(r) (z - z_ref), h = 1 / (alpha + r), r = |z - z_ref|,
    alpha = softplus(.) > 0 and beta = -alpha + softplus(.) >= -alpha (invertible).
    log|det| = (D - 1) log(1 + beta h) + log(1 + beta h - beta h^2 r)."""

    option = "radial"

    def extra(self, latent_dim: int) -> int:
        return self.n_steps * (latent_dim + 2)

    def build(self, params: torch.Tensor, d: int) -> list:
        steps = []
        for p in params.split(d + 2, dim=-1):
            ref, alpha = p[..., :d], F.softplus(p[..., d])
            beta = -alpha + F.softplus(p[..., d + 1])
            steps.append(lambda z, ref=ref, alpha=alpha, beta=beta:
                         radial_step(z, ref, alpha, beta))
        return steps


def radial_step(z: torch.Tensor, ref: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    diff = z - ref
    r = diff.norm(dim=-1)
    h = 1 / (alpha + r)
    bh = beta * h
    log_det = (z.shape[-1] - 1) * torch.log1p(bh) + torch.log1p(bh - beta * h.pow(2) * r)
    return z + bh.unsqueeze(-1) * diff, log_det


class MADE(nn.Module):
    """A masked autoencoder (Germain et al. 2015) with one hidden layer: outputs m and s for
    dimension i depend on z_<i only (and on the context h, which is not masked)."""

    def __init__(self, d: int, hidden: int, context: int):
        super().__init__()
        self.inp, self.ctx = nn.Linear(d, hidden), nn.Linear(context, hidden, bias=False)
        self.out = nn.Linear(hidden, 2 * d)
        degree_in = torch.arange(1, d + 1)
        degree_h = torch.arange(hidden) % max(d - 1, 1) + 1  # 1..d-1: each unit sees z_<=k
        self.register_buffer("mask_in", (degree_h[:, None] >= degree_in[None]).float())
        mask_out = (degree_in[:, None] > degree_h[None]).float()
        self.register_buffer("mask_out", torch.cat([mask_out, mask_out]))
        nn.init.zeros_(self.out.weight)  # start as the identity step (s = sigmoid(bias))
        nn.init.constant_(self.out.bias[d:], 2.0)  # forget-gate bias: s near 1

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.elu(F.linear(z, self.inp.weight * self.mask_in, self.inp.bias) + self.ctx(h))
        m, s = F.linear(a, self.out.weight * self.mask_out, self.out.bias).chunk(2, dim=-1)
        return m, s


class IAF(Flow):
    """Inverse autoregressive flow (Kingma et al. 2016, the numerically stable form):
    z' = sigmoid(s) z + (1 - sigmoid(s)) m, (m, s) = MADE_k(z, h), log|det| = sum log
    sigmoid(s); the dimensions' order is reversed after each step. The MADEs are global
    networks; only the context h [``context``] comes from the encoder."""

    option = "iaf"

    def __init__(self, steps: int = 2, context: int = 16, hidden: int = 64,
                 logvar_min: float = -30.0, logvar_max: float = 20.0, *, latent_dim: int):
        super().__init__(steps, logvar_min, logvar_max)
        if context < 1 or hidden < 1:
            raise UserError("posterior.context and posterior.hidden must be >= 1")
        self.context = context
        self.made = nn.ModuleList(MADE(latent_dim, hidden, context) for _ in range(steps))

    def extra(self, latent_dim: int) -> int:
        return self.context

    def build(self, params: torch.Tensor, d: int) -> list:
        return [lambda z, made=made, k=k: iaf_step(z, params, made, k % 2 == 1)
                for k, made in enumerate(self.made)]


def iaf_step(z: torch.Tensor, h: torch.Tensor, made: MADE,
             reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if reverse:
        z = z.flip(-1)
    m, s = made(z, h.expand(*z.shape[:-1], h.shape[-1]))
    gate = torch.sigmoid(s)
    out = gate * z + (1 - gate) * m
    return (out.flip(-1) if reverse else out), F.logsigmoid(s).sum(-1)

