"""Divergences that pull q(z|x) towards p(z), weighted by beta in the objective.

Protocol: ``forward(q, z, prior)`` gets the posterior distribution, the sample z used for
the reconstruction and the prior module, and returns a dict of batch-level scalars whose
"div" entry enters the loss; other entries are logged as extra metric columns.
``bind(prior, family)`` runs once when the model is composed (a KL decides there whether it
is analytic); which combinations are refused is objective/rules.py's. ``iw_weight()`` says
how the divergence enters an importance-weighted bound (None: it has no such form).
Sample-based divergences (mmd, sliced, adversarial) compare the batch of z, i.e. the
aggregate posterior, with as many prior samples: they need a batch of at least 2.
A divergence that trains a network of its own (the adversarial critic, FactorVAE's
discriminator) does so through the auxiliary protocol (objective/auxiliary.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence

from vae_cli.errors import UserError
from vae_cli.objective.auxiliary import Auxiliary, Detached
from vae_cli.objective.critics import Critic, Discriminator
from vae_cli.objective.posteriors import Posterior
from vae_cli.objective.priors import Prior

ESTIMATORS = ("auto", "analytic", "mc")
KERNELS = ("imq", "rbf")
# WAE's scales: the base bandwidth C = 2 * d * sigma_p^2 times each of these.
MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Divergence(Auxiliary, nn.Module):
    # True when recon + KL is a negative ELBO: enables nelbo, bits/dim and the IWAE bound.
    # The KL is the "kl" entry of forward's result when present, else "div".
    bounds_likelihood: bool = False

    def __init__(self, beta: float = 1.0):
        super().__init__()
        if beta < 0:
            raise UserError(f"divergence.beta={beta} must be >= 0")
        self.beta = float(beta)

    def bind(self, prior: Prior, family: Posterior | None = None) -> None:
        """Called once with the model's prior and posterior family (rules.py has judged
        them already)."""

    def weight(self) -> float:
        """The factor on div in the objective (before any schedule)."""
        return self.beta

    def iw_weight(self) -> float | None:
        """The exponent w in the importance-weighted bound log (1/k) sum_i p(x|z_i)
        (p(z_i) / q(z_i|x))^w, which is this divergence's objective at k = 1; None where the
        divergence has no such form."""
        return None

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class KL(Divergence):
    """KL(q(z|x) || p(z)): closed form when torch.distributions has one, else Monte Carlo.

    The Monte Carlo estimate log q(z|x) - log p(z) uses the same z as the reconstruction,
    so it is unbiased and costs no extra decoder pass. ``free_bits`` (Kingma et al. 2016)
    floors the batch-mean KL of each latent dimension at that many nats.
    """

    bounds_likelihood = True

    def __init__(self, beta: float = 1.0, estimator: str = "auto", free_bits: float = 0.0):
        super().__init__(beta)
        if estimator not in ESTIMATORS:
            raise UserError(f"divergence.estimator={estimator!r} is not one of {ESTIMATORS}")
        if free_bits < 0:
            raise UserError(f"divergence.free_bits={free_bits} must be >= 0")
        self.estimator, self.free_bits = estimator, float(free_bits)
        self._analytic: bool | None = None

    def bind(self, prior: Prior, family: Posterior | None = None) -> None:
        """Analytic where torch.distributions has the closed form and q has a density
        everywhere (a discrete latent's KL over its codes is exact); else Monte Carlo."""
        if getattr(prior, "discrete", False):
            self._analytic = True
            return
        dense = family is None or family.closed_form
        layerwise = getattr(family, "layerwise_kl", False)  # model=vdvae: per layer, given z_<l
        self._analytic = self.estimator != "mc" and (
            layerwise or (dense and prior.kl_closed_form()))

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        if self._analytic is None:
            self.bind(prior)
        if not self._analytic:
            return {"div": (q.log_prob(z) - prior.dist().log_prob(z)).mean()}
        if not self.free_bits:
            return {"div": prior.kl(q).mean()}
        per_dim = kl_divergence(q.base_dist, prior.dist().base_dist).mean(0)  # [D], batch mean
        kl = per_dim.sum()
        # The floor changes only the gradient: logged "kl" stays the true value.
        return {"div": per_dim.clamp(min=self.free_bits).sum(), "kl": kl}

    def iw_weight(self) -> float | None:
        return None if self.free_bits else self.beta


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).pow(2)


class MMD(Divergence):
    """WAE-MMD (Tolstikhin et al. 2018) between the batch of z and prior samples.

    Unbiased U-statistic: off-diagonal means within each sample (n(n-1) pairs), the full
    mean across (n^2 pairs). Kernels summed over WAE's scales of C = 2 d sigma_p^2:
    imq C / (C + |x-y|^2), or rbf exp(-|x-y|^2 / C).
    """

    def __init__(self, beta: float = 10.0, kernel: str = "imq", prior_scale: float = 1.0):
        super().__init__(beta)
        if kernel not in KERNELS:
            raise UserError(f"divergence.kernel={kernel!r} is not one of {KERNELS}")
        if not prior_scale > 0:
            raise UserError(f"divergence.prior_scale={prior_scale} must be > 0 (the kernels' "
                            "bandwidth is proportional to its square)")
        self.kernel, self.prior_scale = kernel, prior_scale

    def k(self, d2: torch.Tensor, dim: int) -> torch.Tensor:
        base = 2.0 * dim * self.prior_scale**2
        out = torch.zeros_like(d2)
        for s in MMD_SCALES:
            c = base * s
            out = out + (c / (c + d2) if self.kernel == "imq" else torch.exp(-d2 / c))
        return out

    def mmd(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, m, d = len(x), len(y), x.shape[1]
        if n < 2 or m < 2:
            raise UserError("divergence=mmd needs trainer.batch_size >= 2")
        kxx, kyy = self.k(_sq_dists(x, x), d), self.k(_sq_dists(y, y), d)
        kxy = self.k(_sq_dists(x, y), d)
        off = lambda k, n: (k.sum() - k.diagonal().sum()) / (n * (n - 1))  # noqa: E731
        return off(kxx, n) + off(kyy, m) - 2 * kxy.mean()

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        return {"div": self.mmd(z.float(), prior.sample(len(z)).float())}


class SlicedWasserstein(Divergence):
    """Sliced Wasserstein distance SW_p^p (Kolouri et al. 2019): project both batches on
    random unit directions, sort each projection, average |difference|^p."""

    def __init__(self, beta: float = 10.0, projections: int = 50, p: float = 2.0):
        super().__init__(beta)
        if projections < 1 or p < 1:
            raise UserError("divergence.projections must be >= 1 and divergence.p >= 1")
        self.projections, self.p = projections, p

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        theta = torch.randn(x.shape[1], self.projections, device=x.device)
        theta = theta / theta.norm(dim=0, keepdim=True)
        px, _ = (x @ theta).sort(dim=0)
        py, _ = (y @ theta).sort(dim=0)
        return (px - py).abs().pow(self.p).mean()

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        return {"div": self.distance(z.float(), prior.sample(len(z)).float())}


class Adversarial(Divergence):
    """Wasserstein-1 between the aggregate posterior and the prior, estimated by a critic on
    z kept Lipschitz by ``lipschitz`` (gp | clip | spectral, see critics.py). The encoder
    minimises E_q f(z) - E_p f(z); the critic maximises it (minus the gradient penalty under
    gp) in ``critic_steps`` steps of its own optimizer after each encoder step (the
    auxiliary step the training loop runs): Adam, or RMSprop under clip as in Arjovsky et
    al. 2017. Its parameters are frozen otherwise, so the main loss neither trains it nor
    spends a backward pass on it."""

    def __init__(self, beta: float = 1.0, hidden: int = 256, critic_steps: int = 5,
                 lr: float = 1e-4, gp_weight: float = 10.0, lipschitz: str = "gp",
                 clip: float = 0.01, *, latent_dim: int):
        super().__init__(beta)
        if critic_steps < 1 or hidden < 1 or not lr > 0:
            raise UserError("divergence.critic_steps, hidden and lr must be positive")
        self.critic = Critic(latent_dim, hidden, lipschitz, clip)
        self.critic.requires_grad_(False)
        self.auxiliary_steps, self.gp_weight, self.lr = critic_steps, gp_weight, lr

    def w1(self, zq: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return self.critic.gap(zq, zp)

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        return {"div": self.w1(z.float(), prior.sample(len(z)).float())}

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def auxiliary_optimizer(self) -> torch.optim.Optimizer:
        if self.critic.lipschitz == "clip":
            return torch.optim.RMSprop(self.auxiliary_parameters(), lr=self.lr)
        return torch.optim.Adam(self.auxiliary_parameters(), lr=self.lr, betas=(0.5, 0.9))

    def auxiliary_loss(self, batch: Detached) -> torch.Tensor:
        """What the critic minimises on detached posterior samples: -W1 (+ penalty)."""
        zq = batch.z
        with torch.no_grad():
            zp = batch.prior.sample(len(zq)).float()
        return -self.w1(zq, zp) + self.gp_weight * self.critic.penalty(zq, zp)

    def after_auxiliary_step(self, batch: Detached) -> None:
        with torch.no_grad():
            zp = batch.prior.sample(len(batch.z)).float()
        self.critic.constrain(zp)


class TotalCorrelation(Divergence):
    """beta-TCVAE (Chen et al. 2018): KL = index-code MI + total correlation + dimension-wise
    KL, each with its own weight; ``beta`` weights the total correlation and the objective
    adds the weighted sum with weight 1 (a schedule still scales it).

    log q(z) and log prod_d q(z_d) are estimated from the batch with the true training-set
    size N. ``estimator=mss`` (minibatch stratified sampling, the paper's appendix): weights
    1/N on the example's own posterior, (N-M)/(NM) on one other, 1/M on the remaining M-1
    (M = batch - 1); each row sums to one, so the estimate of q(z) is unbiased and TC of a
    factorised batch is ~0. ``mws`` (minibatch weighted sampling): every weight 1/(N * batch),
    which offsets TC by up to (D-1) log(N * batch) nats; the offset is constant in the
    parameters, so gradients match, but reported values do not.
    """

    bounds_likelihood = True  # at alpha = beta = gamma = 1 the three terms sum to the KL

    def __init__(self, alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
                 estimator: str = "mss", *, dataset_size: int):
        super().__init__(beta)
        if min(alpha, gamma) < 0:
            raise UserError("divergence.alpha and divergence.gamma must be >= 0")
        if estimator not in ("mss", "mws"):
            raise UserError(f"divergence.estimator={estimator!r} is not one of ('mss', 'mws')")
        self.alpha, self.gamma, self.estimator = alpha, gamma, estimator
        self.dataset_size = dataset_size

    def log_weights(self, b: int, device: torch.device) -> torch.Tensor:
        """[b, b] log importance weights of q(z_i | x_j) in the estimate of q(z_i)."""
        n = self.dataset_size
        if self.estimator == "mws":
            return torch.full((b, b), -math.log(n * b), device=device)
        m = b - 1
        # masked_fill, not indexed assignment: a Python value put by index is first copied
        # from the host, which a CUDA graph cannot capture
        idx = torch.arange(b, device=device)
        own = idx.unsqueeze(1) == idx
        other = ((idx + 1) % b).unsqueeze(1) == idx
        w = torch.full((b, b), 1.0 / m, device=device)
        return w.masked_fill(own, 1.0 / n).masked_fill(other, max(n - m, 0) / (n * m)).log()

    def terms(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        b = len(z)
        if b < 2:
            raise UserError("divergence=tc needs trainer.batch_size >= 2")
        base = q.base_dist
        # log q(z_i,d | x_j) for every pair (i, j): [B, B, D]
        pair = Normal(base.loc.unsqueeze(0), base.scale.unsqueeze(0),
                      validate_args=False).log_prob(z.unsqueeze(1))
        lw = self.log_weights(b, z.device)
        log_qz = torch.logsumexp(pair.sum(2) + lw, dim=1)
        log_prod = torch.logsumexp(pair + lw.unsqueeze(2), dim=1).sum(1)
        log_qzx, log_pz = q.log_prob(z), prior.log_prob(z)
        return {"mi": (log_qzx - log_qz).mean(), "tc": (log_qz - log_prod).mean(),
                "dwkl": (log_prod - log_pz).mean()}

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        t = self.terms(q, z, prior)
        div = self.alpha * t["mi"] + self.beta * t["tc"] + self.gamma * t["dwkl"]
        return {"div": div, "kl": t["mi"] + t["tc"] + t["dwkl"], **t}

    def weight(self) -> float:
        return 1.0  # the weights are inside div


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each column of z [B, D] shuffled by its own random permutation of the batch: every
    dimension keeps exactly its batch marginal, and the dimensions become independent, so
    the rows are samples of prod_j q(z_j) (Kim & Mnih 2018, Algorithm 1)."""
    order = torch.rand(z.shape, device=z.device).argsort(dim=0)
    return z.gather(0, order)


class FactorVAE(Divergence):
    """FactorVAE (Kim & Mnih 2018): beta * KL(q(z|x) || p(z)) + gamma * TC, beta = 1 in the
    paper. The total correlation TC = KL(q(z) || prod_j q(z_j)) is estimated by the
    density-ratio trick: a discriminator D tells samples of q(z) from samples of
    prod_j q(z_j), and TC ~ E_q(z)[log D(z) / (1 - D(z))], the mean of its logit gap over the
    batch of z. The encoder minimises that estimate through z with D frozen (no gradient
    reaches D from the main loss).

    D is trained as the auxiliary step, ``discriminator_steps`` steps of its own Adam after
    each VAE step, on the step's detached z: the first half of the batch are the q(z)
    samples and the second half, each dimension permuted across that half, the
    prod_j q(z_j) samples. The paper draws a second batch for the permuted samples; two
    halves of one batch are that, at half the size, with no extra encoder pass; the real
    and permuted samples then come from different examples, as with two batches
    (disentanglement_lib permutes the same batch it classifies). KL is the ``kl``
    divergence's estimate: closed form between Gaussians, Monte Carlo otherwise, so every
    prior and posterior family works.
    """

    bounds_likelihood = True  # the "kl" entry is the KL of the ELBO

    def __init__(self, beta: float = 1.0, gamma: float = 40.0, hidden: int = 256,
                 layers: int = 4, discriminator_steps: int = 1, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.5, 0.9), *, latent_dim: int):
        super().__init__(beta)
        if gamma < 0:
            raise UserError(f"divergence.gamma={gamma} must be >= 0")
        if discriminator_steps < 1 or not lr > 0:
            raise UserError("divergence.discriminator_steps must be >= 1 and divergence.lr > 0")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise UserError(f"divergence.betas={list(betas)} must be two numbers in [0, 1)")
        self.gamma, self.lr, self.betas = float(gamma), float(lr), tuple(betas)
        self.kl = KL()
        self.discriminator = Discriminator(latent_dim, hidden, layers)
        self.discriminator.requires_grad_(False)  # trained by the auxiliary step only
        self.auxiliary_steps = discriminator_steps

    def bind(self, prior: Prior, family: Posterior | None = None) -> None:
        self.kl.bind(prior, family)  # a flow: Monte Carlo KL; D needs only samples of z

    def weight(self) -> float:
        return 1.0  # beta and gamma are inside div

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        kl = self.kl(q, z, prior)["div"]
        tc = self.discriminator.log_ratio(z.float()).mean()
        return {"div": self.beta * kl + self.gamma * tc, "kl": kl, "tc": tc}

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def auxiliary_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.auxiliary_parameters(), lr=self.lr, betas=self.betas)

    def auxiliary_loss(self, batch: Detached) -> torch.Tensor:
        """D's cross-entropy: the first half of the (detached) batch labelled q(z) (0), the
        second half with its dimensions permuted labelled prod_j q(z_j) (1)."""
        z = batch.z
        n = len(z) // 2
        if n < 2:
            raise UserError("divergence=factorvae needs trainer.batch_size >= 4: half of the "
                            "batch is permuted to train the discriminator")
        joint, marginals = z[:n], permute_dims(z[n:2 * n])
        labels = torch.cat([torch.zeros(n), torch.ones(n)]).long().to(z.device)
        logits = self.discriminator(torch.cat([joint, marginals])).float()
        return F.cross_entropy(logits, labels)


class DIP(Divergence):
    """DIP-VAE (Kumar et al. 2018): beta * KL(q(z|x) || p(z)) + a penalty pulling the
    covariance C of the aggregate posterior towards the identity, the prior's:
    lambda_od * sum_{i != j} C_ij^2 + lambda_d * sum_i (C_ii - 1)^2, over the batch.
    ``type=i``: C = Cov[mu(x)], the covariance of the encoder means; ``type=ii``:
    C = E[diag sigma^2(x)] + Cov[mu(x)], the covariance of z itself. Covariances divide by
    the batch size (E[mu mu^T] - E[mu] E[mu]^T), as disentanglement_lib computes them.
    ``lambda_d`` left null takes the paper's and disentanglement_lib's ratio: 10 lambda_od
    for DIP-VAE-I, lambda_od for DIP-VAE-II. The identity is N(0, I)'s covariance, so only
    prior=normal is accepted, and mu and sigma are the diagonal Gaussian posterior's, so flow
    posteriors are refused.
    """

    bounds_likelihood = True  # the "kl" entry is the KL of the ELBO

    def __init__(self, beta: float = 1.0, type: Literal["i", "ii"] = "i",
                 lambda_od: float = 10.0, lambda_d: float | None = None):
        super().__init__(beta)
        if type not in ("i", "ii"):
            raise UserError(f"divergence.type={type!r} is not one of ('i', 'ii')")
        if lambda_d is None:
            lambda_d = (10.0 if type == "i" else 1.0) * lambda_od
        if min(lambda_od, lambda_d) < 0:
            raise UserError("divergence.lambda_od and divergence.lambda_d must be >= 0")
        self.type, self.lambda_od, self.lambda_d = type, float(lambda_od), float(lambda_d)
        self.kl = KL()

    def bind(self, prior: Prior, family: Posterior | None = None) -> None:
        self.kl.bind(prior, family)

    def weight(self) -> float:
        return 1.0  # beta and the lambdas are inside div

    def covariance(self, q: Distribution) -> torch.Tensor:
        """C [D, D] over the batch: Cov[mu] (i), plus the mean posterior variance (ii)."""
        mu = q.base_dist.loc.float()
        centred = mu - mu.mean(0)
        cov = centred.T @ centred / len(mu)
        if self.type == "ii":
            cov = cov + torch.diag(q.base_dist.scale.float().pow(2).mean(0))
        return cov

    def penalty(self, cov: torch.Tensor) -> torch.Tensor:
        diag = cov.diagonal()
        off = cov - torch.diag(diag)
        return self.lambda_od * off.pow(2).sum() + self.lambda_d * (diag - 1).pow(2).sum()

    def forward(self, q: Distribution, z: torch.Tensor, prior: Prior) -> dict[str, torch.Tensor]:
        if len(z) < 2 and self.training:
            raise UserError("divergence=dip needs trainer.batch_size >= 2 (a covariance over "
                            "the batch)")
        kl = self.kl(q, z, prior)["div"]
        dip = self.penalty(self.covariance(q))
        return {"div": self.beta * kl + dip, "kl": kl, "dip": dip}
