"""Reconstruction terms -log p(x|z), summed over every dimension of one example.

Protocol: ``out_mult`` decoder outputs per data channel; ``nll(out, x)`` returns [B] nats
(or [k, B] when out carries k leading samples and x broadcasts against it, as in IWAE);
``mean(out)`` returns the image to show, in [0, 1]; ``density`` says whether nll is a
negative log-density (nats: the negative ELBO and its bounds mean something), and
``adversarial`` gives the terms of a discriminator on x that it trains (auxiliary.py), if
any. Log-densities are computed in float32
even when the decoder ran under autocast. ``tokens`` says whether it also scores token
sequences (int64 [B, L]; out [N, V], the logits of x's N non-<pad> positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.errors import UserError
from vae_cli.objective.auxiliary import Auxiliary
from vae_cli.tokens import is_tokens, scored


def _per_example(t: torch.Tensor) -> torch.Tensor:
    """Sum over the image dimensions (C, H, W), whatever leading dims come before."""
    return t.flatten(-3).sum(-1)


class Likelihood(Auxiliary, nn.Module):
    option = "likelihood"  # its name in the loss group, for messages
    out_mult: int = 1
    tokens: bool = False
    density: bool = True

    def ready(self) -> None:
        """Load what computing the loss needs beyond the weights (LPIPS's network), so
        that training stops on it in one line before any step; reading a trained model
        (sampling, exporting) needs none of it."""

    def adversarial(self, out: torch.Tensor, recon: torch.Tensor,
                    last_layer: Callable[[], nn.Parameter], step: int | None
                    ) -> dict[str, torch.Tensor]:
        """The terms of its adversary on x for decoder output ``out`` whose batch-mean
        nll is ``recon``: "adv" enters the loss, the rest are logged; {} without one.
        ``step``: the training step (None outside training)."""
        return {}

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Bernoulli with logits: binary_cross_entropy_with_logits, never sigmoid then BCE.

    On grey-level targets in [0, 1] this is the cross-entropy used by pytorch/examples;
    it is a probability in nats only on binary data (dataset=binarized_mnist, shapes).
    """

    option = "bernoulli"

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = out.float()
        bce = F.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none")
        return _per_example(bce)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out.float())


class _Scaled(Likelihood):
    """A location family with one scale, fixed or learned (one scalar, as in the two-stage
    VAE of Dai & Wipf 2019, where learning it balances recon against the divergence)."""

    def __init__(self, scale: float, learn: bool, name: str):
        super().__init__()
        if not scale > 0:
            raise UserError(f"loss.{name}={scale} must be > 0")
        log_scale = torch.tensor(math.log(scale))
        if learn:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().clamp(0, 1)


class Gaussian(_Scaled):
    """-log N(x | decoder mean, sigma^2)."""

    option = "gaussian"

    def __init__(self, sigma: float = 0.1, learn_sigma: bool = False):
        super().__init__(sigma, learn_sigma, "sigma")

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        sq = ((x - out.float()) * torch.exp(-self.log_scale)).pow(2)
        dims = math.prod(sq.shape[-3:])
        return 0.5 * _per_example(sq) + dims * (self.log_scale + 0.5 * math.log(2 * math.pi))


class SquaredError(Likelihood):
    """The sum of squared errors over an example, ||x - x_hat||^2: no 1/2, no sigma. It is
    -log N(x | x_hat, 1/2) up to the constant D/2 log(pi) (D values per example), so
    loss=gaussian with sigma s scores mse / (2 s^2) + D (log s + log(2 pi) / 2) nats."""

    option = "mse"

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _per_example((x - out.float()).pow(2))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().clamp(0, 1)


class Laplace(_Scaled):
    """-log Laplace(x | decoder location, b): an L1 reconstruction with a proper scale."""

    option = "laplace"

    def __init__(self, scale: float = 0.1, learn_scale: bool = False):
        super().__init__(scale, learn_scale, "scale")

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = (x - out.float()).abs() * torch.exp(-self.log_scale)
        return _per_example(a) + math.prod(a.shape[-3:]) * (self.log_scale + math.log(2))


def _levels(x: torch.Tensor, bins: int) -> torch.Tensor:
    """[0, 1] floats back to integer levels 0..bins-1 (exact for x = k / (bins - 1))."""
    return (x * (bins - 1)).round().long().clamp_(0, bins - 1)


class Categorical(Likelihood):
    """A softmax over 256 levels per sub-pixel: a discrete likelihood of 8-bit images; on
    token sequences, a softmax over the vocabulary per position, <pad> never scored."""

    option = "categorical"

    tokens = True

    def __init__(self, classes: int = 256):
        super().__init__()
        if classes < 2:
            raise UserError(f"loss.classes={classes} must be >= 2")
        self.classes = classes
        self.out_mult = classes

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """[..., C * K, H, W] -> [..., C, K, H, W]."""
        *lead, ck, h, w = out.shape
        return out.float().view(*lead, ck // self.classes, self.classes, h, w)

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if is_tokens(x):
            return sequence_nll(out, x)
        logp = self._logits(out).log_softmax(-3)
        target = _levels(x, self.classes).unsqueeze(-3).expand(*logp.shape[:-3], 1,
                                                               *logp.shape[-2:])
        return -_per_example(logp.gather(-3, target).squeeze(-3))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        p = self._logits(out).softmax(-3)
        levels = torch.arange(self.classes, device=out.device, dtype=p.dtype)
        return (p * levels.view(-1, 1, 1)).sum(-3) / (self.classes - 1)


def sequence_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) summed over the positions of each sequence, [B]: token ids x [B, L],
    logits [N, V] of its N scored positions in the order of x[scored(x)]; <pad> positions
    have no logits and contribute exactly 0."""
    mask = scored(x)
    nll = F.cross_entropy(logits.float(), x[mask], reduction="none")
    return torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).masked_scatter(
        mask, nll).sum(-1)


def bin_centres(x: torch.Tensor, bins: int) -> torch.Tensor:
    """[0, 1] pixels as the centres of their bins in [-1, 1] coordinates."""
    return 2 * _levels(x, bins).float() / (bins - 1) - 1


def bin_log_prob(y: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                 bins: int) -> torch.Tensor:
    """log of a logistic(loc, e^log_scale)'s mass on the bin [y - 1/(bins-1), y + 1/(bins-1)]
    around each bin centre y in [-1, 1], the end bins open to +-infinity (broadcasting)."""
    half, inv = 1.0 / (bins - 1), torch.exp(-log_scale)
    plus, minus = inv * (y - loc + half), inv * (y - loc - half)
    log_cdf_plus = F.logsigmoid(plus)  # log P(X <= upper edge), used at the bottom bin
    log_sf_minus = F.logsigmoid(-minus)  # log P(X > lower edge), used at the top bin
    # log(s(plus) - s(minus)) without cancellation: s(a) - s(b) = s(a) s(-b) (1 - e^(b-a)).
    mid = F.logsigmoid(plus) + F.logsigmoid(-minus) + torch.log(
        -torch.expm1(minus - plus).clamp(max=-1e-12))
    return torch.where(y < -1 + half, log_cdf_plus, torch.where(y > 1 - half, log_sf_minus,
                                                                mid))


class DiscretizedLogistic(Likelihood):
    """Discretized logistic (Salimans et al. 2017, one component): the probability mass of
    the bin [x - 1/255, x + 1/255] in [-1, 1] coordinates, edges open to +-infinity."""

    option = "logistic"

    out_mult = 2

    def __init__(self, bins: int = 256, min_log_scale: float = -7.0):
        super().__init__()
        self.bins, self.min_log_scale = bins, min_log_scale

    def _params(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_scale = out.float().chunk(2, dim=-3)
        return loc, log_scale.clamp(min=self.min_log_scale)

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loc, log_scale = self._params(out)
        return -_per_example(bin_log_prob(bin_centres(x, self.bins), loc, log_scale,
                                          self.bins))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return ((self._params(out)[0] + 1) / 2).clamp(0, 1)
