"""``loss=logistic_mixture``: the discretized mixture of logistics of PixelCNN++ (Salimans
et al. 2017), the likelihood VDVAE and NVAE score 8-bit images with.

Each pixel is a mixture of K components shared by its channels. Within a component the
channels are logistics over 256 bins in [-1, 1] (the end bins open to +-infinity, as
``loss=logistic``), and for RGB each channel's mean also moves linearly with the channels
before it: m_G = mu_G + a x_R, m_B = mu_B + b x_R + c x_G, with a, b, c = tanh of decoder
outputs. So log p(pixel) = logsumexp_k (log pi_k + sum_c log p_k(x_c | x_<c)), a proper
distribution over the 256^C values of a pixel (tested: the masses sum to 1).

Decoder outputs per data channel (``out_mult``): 3K for grey images (mixture logits,
means, log-scales), 4K for colour (and one coupling coefficient set per channel: the
green one is a, the blue one b, the red one c). The mixture logits are the channels' summed.
"""

from __future__ import annotations

import torch

from vae_cli.errors import UserError
from vae_cli.objective.likelihoods import Likelihood, bin_centres, bin_log_prob


class LogisticMixture(Likelihood):
    option = "logistic_mixture"

    def __init__(self, components: int = 10, bins: int = 256, min_log_scale: float = -7.0,
                 *, shape: tuple[int, ...]):
        super().__init__()
        if components < 1 or bins < 2:
            raise UserError("loss.components must be >= 1 and loss.bins >= 2")
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise UserError("loss=logistic_mixture scores grey or RGB images")
        self.k, self.bins, self.min_log_scale = components, bins, min_log_scale
        self.colour = shape[0] == 3
        self.out_mult = (4 if self.colour else 3) * components

    def _params(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., C * out_mult, H, W] -> logits [..., K, H, W], means, log-scales and
        coefficients [..., C, K, H, W] (coefficients None for grey images)."""
        *lead, _, h, w = out.shape
        per = out.float().view(*lead, -1, self.out_mult // self.k, self.k, h, w)
        logits = per[..., 0, :, :, :].sum(-4)
        means, log_scales = per[..., 1, :, :, :], per[..., 2, :, :, :]
        coeffs = torch.tanh(per[..., 3, :, :, :]) if self.colour else None
        return logits, means, log_scales.clamp(min=self.min_log_scale), coeffs

    @staticmethod
    def coupled(means: torch.Tensor, coeffs: torch.Tensor | None,
                y: torch.Tensor) -> torch.Tensor:
        """The channels' means given the channels before them (values y [..., C, 1, H, W]
        broadcast against the K components)."""
        if coeffs is None:
            return means
        r, g, b = means.unbind(-4)
        c_b_from_g, a, b_from_r = coeffs.unbind(-4)  # red's set couples blue to green
        g = g + a * y[..., 0, :, :, :]
        b = b + b_from_r * y[..., 0, :, :, :] + c_b_from_g * y[..., 1, :, :, :]
        return torch.stack([r, g, b], -4)

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits, means, log_scales, coeffs = self._params(out)
        y = bin_centres(x, self.bins).unsqueeze(-3)  # [..., C, 1, H, W]
        y = y.expand(*means.shape[:-3], 1, *means.shape[-2:])
        per_channel = bin_log_prob(y, self.coupled(means, coeffs, y), log_scales, self.bins)
        log_p = torch.logsumexp(per_channel.sum(-4) + logits.log_softmax(-3), dim=-3)
        return -log_p.flatten(-2).sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The mixture's mean per channel, each given the means of the channels before it
        (a logistic's mean is its location; the end bins' clipping is ignored)."""
        logits, means, _, coeffs = self._params(out)
        pi = logits.softmax(-3)
        if coeffs is None:
            return (((pi.unsqueeze(-4) * means).sum(-3) + 1) / 2).clamp(0, 1)
        zero, shown = torch.zeros_like(pi[..., :1, :, :]), []
        for c in range(3):
            given = torch.stack(shown + [zero] * (3 - len(shown)), -4)
            shown.append((pi * self.coupled(means, coeffs, given)[..., c, :, :, :]
                          ).sum(-3, keepdim=True))
        return ((torch.cat(shown, -3) + 1) / 2).clamp(0, 1)
