"""Discrete latents: categorical variables relaxed by Gumbel-softmax, and a vector-quantised
grid of codebook entries (VQ-VAE). Both are posterior families (``posterior=gumbel``,
``posterior=vq``) whose prior is ``prior=uniform``, the uniform distribution over their codes.

- ``gumbel`` (Jang et al. 2017; Maddison et al. 2017): z is N one-hot vectors of K classes,
  laid end to end (model.latent_dim = N x K). Training decodes the relaxed sample
  softmax((logits + g) / tau), g ~ Gumbel(0, 1), tau annealed from ``temperature`` down to
  ``min_temperature`` as tau = max(min, tau0 exp(-rate t)) (the paper's schedule, updated
  every step); ``straight_through`` decodes the hard one-hot with the relaxed gradient.
  Outside training (validation, evaluation, pictures) z is a hard sample (the Gumbel-max
  trick: an exact draw from the categorical), so the bounds reported are those of the
  discrete model. The KL to the uniform prior is analytic, sum_n sum_k q log(K q).
- ``vq`` (van den Oord et al. 2017): the conv/resnet encoder's feature map [D, H, W] is
  snapped position by position to the nearest of K codebook vectors; the decoder reads the
  snapped map, gradients pass to the encoder straight through. q(z|x) is a point mass, so
  KL(q || uniform) = H W log K, a constant (the paper's remark); what trains the codebook
  is its own loss: the commitment term beta |z_e - sg(e)|^2 and either the codebook term
  |sg(z_e) - e|^2 or, with ``ema`` (the paper's appendix), exponential moving averages of
  the assigned encoder outputs (Laplace-smoothed counts, as in Sonnet's implementation).
  Both terms are squared distances summed over the grid per example, as the
  log-likelihood is summed over pixels. Codes whose moving-average count falls under
  ``restart`` are restarted from random encoder outputs of the batch (Dhariwal et al.
  2020), which also initialises the codebook from data at the first training step; with
  ``kmeans`` > 0 that initial codebook is refined by as many Lloyd iterations of k-means
  over the first batch's encoder outputs (as vector-quantize-pytorch's ``kmeans_init``).

Both expose their codes to the prior and to a learned prior fitted after training
(``sampler=pixelcnn``): ``grid`` (H, W), ``classes`` K, ``codes(z)`` -> indices and
``embed(indices)`` -> z.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, register_kl

from vae_cli.errors import UserError
from vae_cli.objective.parallel import AllSum, Noise
from vae_cli.objective.posteriors import LatentDistribution, Posterior
from vae_cli.objective.priors import Prior


class Categoricals(LatentDistribution):
    """N independent categoricals of K classes, over one-hot vectors laid end to end:
    event [N * K], ``logits`` [..., N, K]."""

    arg_constraints: dict = {}

    def __init__(self, logits: torch.Tensor):
        self.logits = logits.float().log_softmax(-1)
        n, k = logits.shape[-2:]
        super().__init__(logits.shape[:-2], torch.Size([n * k]), validate_args=False)

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def split(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(*z.shape[:-1], *self.logits.shape[-2:])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return (self.split(z) * self.logits).sum((-1, -2))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = torch.Size(sample_shape) + self.logits.shape
        g = gumbel(torch.rand(shape, device=self.logits.device))
        return one_hot_max(self.logits + g).flatten(-2)

    @property
    def mode_point(self) -> torch.Tensor:
        return one_hot_max(self.logits).flatten(-2)

    @property
    def spread(self) -> torch.Tensor:
        p = self.logits.exp()
        return (p * (1 - p)).sqrt().flatten(-2)


class RelaxedCategoricals(Categoricals):
    """A Gumbel-softmax posterior: relaxed samples at the temperature of the training step,
    hard ones outside training."""

    def __init__(self, logits: torch.Tensor, temperature: Callable[[int], float],
                 straight_through: bool):
        super().__init__(logits)
        self.temperature, self.straight_through = temperature, straight_through
        self.tau: float | None = None  # the temperature of the last relaxed draw

    def draw(self, noise: Noise, lead: tuple[int, ...], step: int | None) -> torch.Tensor:
        g = gumbel(noise(torch.rand, *self.logits.shape[-2:]))
        if step is None:  # the Gumbel-max trick: an exact categorical draw
            return one_hot_max(self.logits + g).flatten(-2)
        self.tau = self.temperature(step)
        soft = torch.softmax((self.logits + g) / self.tau, -1)
        if self.straight_through:
            soft = one_hot_max(soft) - soft.detach() + soft
        return soft.flatten(-2)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform u, clamped away from 0 and 1."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-7)))


def one_hot_max(scores: torch.Tensor) -> torch.Tensor:
    return F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)


@register_kl(Categoricals, Categoricals)
def _kl_categoricals(q: Categoricals, p: Categoricals) -> torch.Tensor:
    return (q.logits.exp() * (q.logits - p.logits)).sum((-1, -2))


class Quantized(LatentDistribution):
    """q(z|x) of a VQ-VAE: a point mass on the snapped map z_q (flattened [D * H * W]), with
    the encoder's map z_e and the code indices [B, H, W]. ``draw`` gives z_q with the
    straight-through gradient to z_e."""

    arg_constraints: dict = {}

    def __init__(self, ze: torch.Tensor, zq: torch.Tensor, indices: torch.Tensor):
        super().__init__(ze.shape[:1], torch.Size([ze[0].numel()]), validate_args=False)
        self.ze, self.zq, self.indices = ze, zq, indices

    @property
    def device(self) -> torch.device:
        return self.ze.device

    def draw(self, noise: Noise, lead: tuple[int, ...], step: int | None) -> torch.Tensor:
        z = (self.ze + (self.zq - self.ze).detach()).flatten(1)
        return z.expand(*lead, *z.shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(z.shape[:-1])  # a point mass: probability 1 on its code

    @property
    def mode_point(self) -> torch.Tensor:
        """The encoder's continuous map z_e: where interpolations move (``generate``
        snaps what it decodes)."""
        return self.ze.flatten(1)

    @property
    def spread(self) -> torch.Tensor:
        return torch.zeros_like(self.mode_point)


class UniformCodes(Distribution):
    """The uniform distribution over the codes of a grid of ``positions`` entries, each one
    of K: log p = -positions log K wherever z is a code map; samples drawn by ``embed``."""

    arg_constraints: dict = {}

    def __init__(self, positions: int, classes: int, latent_dim: int,
                 draw: Callable[[int], torch.Tensor]):
        super().__init__(torch.Size(), torch.Size([latent_dim]), validate_args=False)
        self.positions, self.classes, self.draw = positions, classes, draw

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_full(z.shape[:-1], -self.positions * math.log(self.classes))

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        n = math.prod(sample_shape)
        z = self.draw(n)
        return z.view(*sample_shape, z.shape[-1])


@register_kl(Quantized, UniformCodes)
def _kl_quantized(q: Quantized, p: UniformCodes) -> torch.Tensor:
    return q.ze.new_full(q.batch_shape, p.positions * math.log(p.classes))


class Discrete(Posterior):
    """A posterior over codes: K ``classes`` at each position of a ``grid``."""

    closed_form = False  # no Gaussian density: no VampPrior, tc, DIP, free bits
    discrete = True

    @property
    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def classes(self) -> int:
        raise NotImplementedError

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices [N, H, W] of latents z [N, latent_dim]."""
        raise NotImplementedError

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents z [N, latent_dim] of code indices [N, H, W]."""
        raise NotImplementedError

    def uniform(self, latent_dim: int) -> Distribution:
        raise NotImplementedError


class CodeMap(Discrete):
    """A quantizer of the encoder's feature map: a code at each position of its H x W grid
    (``hw``, set by the model's builder) from the map's model.latent_dim channels; q(z|x)
    is a point mass."""

    spatial = True
    deterministic = True
    hw: tuple[int, int] = (1, 1)  # the encoder's map, set by the model's builder

    def outputs(self, latent_dim: int) -> int:
        return latent_dim  # channels of the encoder's map

    @property
    def grid(self) -> tuple[int, int]:
        return self.hw

    def uniform(self, latent_dim: int) -> Distribution:
        """Each position of the grid one of the K codes, drawn as indices and embedded."""
        rows, cols = self.grid

        def draw(n: int) -> torch.Tensor:
            device = next(itertools.chain(self.buffers(), self.parameters())).device
            return self.embed(torch.randint(self.classes, (n, rows, cols), device=device))

        return UniformCodes(rows * cols, self.classes, latent_dim, draw)


class GumbelSoftmax(Discrete):
    """N categorical variables of ``classes`` classes (N = model.latent_dim / classes), their
    logits from the encoder; see the module docstring for the temperature."""

    option = "gumbel"

    def __init__(self, classes: int = 10, temperature: float = 1.0,
                 min_temperature: float = 0.5, anneal_rate: float = 3e-5,
                 straight_through: bool = False, *, latent_dim: int):
        super().__init__()
        if classes < 2:
            raise UserError(f"posterior.classes={classes} must be >= 2")
        if latent_dim % classes:
            raise UserError(f"model.latent_dim={latent_dim} must be a multiple of "
                            f"posterior.classes={classes} (N variables x K classes)")
        if not 0 < min_temperature <= temperature or anneal_rate < 0:
            raise UserError("posterior temperatures must satisfy 0 < min_temperature <= "
                            "temperature, and anneal_rate >= 0")
        self.k, self.n = classes, latent_dim // classes
        self.tau0, self.tau_min, self.rate = temperature, min_temperature, anneal_rate
        self.straight_through = straight_through
        self.register_buffer("flat", torch.zeros(self.n, self.k), persistent=False)

    def temperature(self, step: int) -> float:
        return max(self.tau_min, self.tau0 * math.exp(-self.rate * step))

    def terms(self, q: RelaxedCategoricals) -> dict[str, torch.Tensor]:
        """The temperature of a training step's draw, logged (train_temperature)."""
        return {} if q.tau is None else {"temperature": q.logits.new_tensor(q.tau)}

    def outputs(self, latent_dim: int) -> int:
        return latent_dim

    def forward(self, h: torch.Tensor) -> RelaxedCategoricals:
        logits = h.float().view(*h.shape[:-1], self.n, self.k)
        return RelaxedCategoricals(logits, self.temperature, self.straight_through)

    @property
    def grid(self) -> tuple[int, int]:
        return (1, self.n)

    @property
    def classes(self) -> int:
        return self.k

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(len(z), 1, self.n, self.k).argmax(-1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return F.one_hot(indices.reshape(len(indices), self.n), self.k).float().flatten(1)

    def uniform(self, latent_dim: int) -> Distribution:
        return Categoricals(self.flat)


class VectorQuantizer(CodeMap):
    """A codebook of ``codes`` vectors of model.latent_dim numbers (see the module
    docstring)."""

    option = "vq"

    def __init__(self, codes: int = 512, commitment: float = 0.25, ema: bool = True,
                 decay: float = 0.99, epsilon: float = 1e-5, restart: float = 1.0,
                 kmeans: int = 0, *, latent_dim: int):
        super().__init__()
        if codes < 2 or commitment < 0 or not 0 < decay < 1 or epsilon <= 0 or restart < 0:
            raise UserError("posterior=vq needs codes >= 2, commitment >= 0, 0 < decay < 1, "
                            "epsilon > 0 and restart >= 0")
        if kmeans < 0 or (kmeans and not (ema and restart)):
            raise UserError("posterior.kmeans refines the codebook's data initialisation: it "
                            "needs posterior.ema=true and posterior.restart > 0, and >= 0 "
                            "iterations")
        self.kmeans = kmeans
        self.k, self.d, self.beta, self.ema = codes, latent_dim, commitment, ema
        self.decay, self.epsilon, self.restart = decay, epsilon, restart
        book = torch.randn(codes, latent_dim)
        if ema:
            self.register_buffer("codebook", book)
        else:
            self.codebook = nn.Parameter(book)
        self.register_buffer("ema_count", torch.ones(codes))
        self.register_buffer("ema_sum", book.clone())
        self.register_buffer("started", torch.tensor(False))
        self.all_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    def distribute(self, all_sum: AllSum) -> None:
        self.all_sum = all_sum

    @property
    def classes(self) -> int:
        return self.k

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of flat [M, D] (squared Euclidean)."""
        book = self.codebook.float()
        d2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.T + book.pow(2).sum(1)
        return d2.argmin(1)

    def forward(self, h: torch.Tensor) -> Quantized:
        ze = h.float()
        b, d, hh, ww = ze.shape
        flat = ze.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and self.ema and self.restart and not self.started:  # data init
            self.restart_codes(flat, torch.ones_like(self.ema_count, dtype=torch.bool))
            self.lloyd(flat)
        idx = self.nearest(flat)
        zq = F.embedding(idx, self.codebook.float()).view(b, hh, ww, d).permute(0, 3, 1, 2)
        if self.training and self.ema:
            self.update(flat, idx)
        return Quantized(ze, zq, idx.view(b, hh, ww))

    @torch.no_grad()
    def update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """The paper's EMA step on the global batch: N <- g N + (1 - g) n, m <- g m +
        (1 - g) sum z_e, e = m / N with N Laplace-smoothed; then dead codes restarted."""
        # counts and sums of the assigned vectors by scatter-adds (no [M, K] one-hot), laid
        # side by side for one all-reduce
        rows = torch.cat([flat.new_ones(len(flat), 1), flat], 1)
        both = self.all_sum(flat.new_zeros(self.k, 1 + flat.shape[1]).index_add_(0, idx, rows))
        counts, sums = both[:, 0], both[:, 1:]
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.epsilon) / (total + self.k * self.epsilon) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.restart:
            self.restart_codes(flat, self.ema_count < self.restart)

    @torch.no_grad()
    def lloyd(self, flat: torch.Tensor) -> None:
        """``kmeans`` iterations of k-means from the current codebook over ``flat``: each
        code moves to the mean of the vectors nearest to it (a code none is nearest to
        stays). The moving averages start from the result."""
        for _ in range(self.kmeans):
            idx = self.nearest(flat)
            rows = torch.cat([flat.new_ones(len(flat), 1), flat], 1)
            both = flat.new_zeros(self.k, 1 + flat.shape[1]).index_add_(0, idx, rows)
            counts, sums = both[:, :1], both[:, 1:]
            moved = torch.where(counts > 0, sums / counts.clamp_min(1), self.codebook.float())
            self.codebook.copy_(moved)
            self.ema_sum.copy_(moved)

    @torch.no_grad()
    def restart_codes(self, flat: torch.Tensor, dead: torch.Tensor) -> None:
        """Dead codes become random encoder outputs of this batch, with a count of 1.
        (Under data parallelism rank 0's choice reaches every replica with the buffers.)"""
        n = int(dead.sum())
        if n:
            pick = flat[torch.randint(len(flat), (n,), device=flat.device)]
            self.codebook[dead] = pick.to(self.codebook.dtype)
            self.ema_sum[dead], self.ema_count[dead] = pick, 1.0
        self.started.fill_(True)

    def terms(self, q: Quantized) -> dict[str, torch.Tensor]:
        """The codebook's own loss ("penalty") and what is logged of it: the commitment and
        codebook terms (per example, summed over the grid), the codebook perplexity
        exp(H(usage)) and the fraction of codes used, in this batch."""
        commit = (q.ze - q.zq.detach()).pow(2).flatten(1).sum(1).mean()
        codebook = (q.ze.detach() - q.zq).pow(2).flatten(1).sum(1).mean()
        penalty = self.beta * commit + (0 if self.ema else codebook)
        return {"penalty": penalty, "commit": commit, "codebook": codebook.detach(),
                **usage(q.indices, self.k)}

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        hh, ww = self.hw
        flat = z.float().view(len(z), self.d, hh, ww).permute(0, 2, 3, 1).reshape(-1, self.d)
        return self.nearest(flat).view(len(z), hh, ww)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.codebook.float()).permute(0, 3, 1, 2).flatten(1)

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return self.embed(self.codes(z))


def usage(indices: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """How a batch uses K codes: the perplexity exp(H) of their frequencies (K when used
    evenly) and the fraction used at least once."""
    counts = torch.bincount(indices.flatten(), minlength=k).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"perplexity": perplexity, "usage": (counts > 0).float().mean()}


class UniformPrior(Prior):
    """p(z) uniform over a discrete posterior's codes (its only prior during training; a
    learned one over codes is fitted afterwards: ``vae sample sampler=pixelcnn``)."""

    discrete = True

    def __init__(self, *, latent_dim: int):
        super().__init__(latent_dim)
        self.__dict__["family"] = None  # the posterior's, not a submodule of the prior

    def attach(self, family: Posterior) -> None:
        self.__dict__["family"] = family

    def dist(self) -> Distribution:
        return self.family.uniform(self.latent_dim)

    @property
    def grid(self) -> tuple[int, int]:
        return self.family.grid

    @property
    def classes(self) -> int:
        return self.family.classes

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return self.family.codes(z)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return self.family.embed(indices)

    @property
    def top_dims(self) -> list[int]:
        return []  # no axis of a code map to traverse
