"""A deep top-down hierarchy over feature maps (model=vdvae), after VDVAE (Child 2021) and
NVAE (Vahdat & Kautz 2020): L stochastic layers z_1 (top) ... z_L, each a map of
``latent_dim`` channels at one of the ``resolutions`` (lowest first).

- The encoder runs residual blocks bottom-up and keeps its activation at every resolution.
- The decoder is the top-down path. It starts from a learned map at the lowest resolution;
  each layer l reads the state h and forms the prior p(z_l | z_<l) from h, and the posterior
  q(z_l | x, z_<l) from h and the encoder's activation at its resolution. Then
  h <- block(h + f(h) + proj(z_l)), the residual parameterisation of both papers.
  Between resolutions h is upsampled (nearest); the last state gives the likelihood's
  parameters.

The rest of vae sees z as one flat vector, the layers' maps concatenated top first.
``TopDown.run`` is the one pass that every use goes through: sampling q (training,
evaluation), sampling p (generation, at a temperature), or reading given z's (the decoder,
log p(z)). The composition into a posterior and a prior is vae_cli.objective.topdown.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.errors import UserError
from vae_cli.nets import Networks, image_shape


class Block(nn.Module):
    """VDVAE's bottleneck block: GELU, 1x1 -> 3x3 -> 3x3 -> 1x1 (1x1 throughout on maps of at
    most 2x2, ``res``), optionally residual. The last convolution starts scaled by
    1 / sqrt(depth), so a deep stack starts near identity."""

    def __init__(self, c_in: int, mid: int, c_out: int, residual: bool, depth: int = 1,
                 res: int = 3):
        super().__init__()
        self.residual = residual
        k = 3 if res > 2 else 1  # a 3x3 kernel sees nothing more on a 1x1 or 2x2 map
        self.convs = nn.ModuleList([
            nn.Conv2d(c_in, mid, 1), nn.Conv2d(mid, mid, k, padding=k // 2),
            nn.Conv2d(mid, mid, k, padding=k // 2), nn.Conv2d(mid, c_out, 1)])
        with torch.no_grad():
            self.convs[-1].weight.mul_(1 / math.sqrt(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = conv(F.gelu(h))
        return x + h if self.residual else h


def resize(h: torch.Tensor, size: int) -> torch.Tensor:
    if h.shape[-1] == size:
        return h
    if h.shape[-1] > size:
        return F.adaptive_avg_pool2d(h, size)
    return F.interpolate(h, size=size, mode="nearest")


def widen(c_in: int, c_out: int) -> nn.Module:
    """Where the width changes between resolutions: a 1x1 convolution (else nothing)."""
    return nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)


class Encoder(nn.Module):
    """x -> the activations at every resolution, highest first, flattened into one row."""

    def __init__(self, c: int, widths: dict[int, int], mids: dict[int, int],
                 blocks: dict[int, int]):
        super().__init__()
        self.resolutions = sorted(widths, reverse=True)
        top = self.resolutions[0]
        self.stem = nn.Conv2d(c, widths[top], 3, padding=1)
        depth = sum(blocks.values())
        above = [top, *self.resolutions[:-1]]  # the resolution each stage comes from
        self.shifts = nn.ModuleList([widen(widths[a], widths[r]) for a, r
                                     in zip(above, self.resolutions, strict=True)])
        self.stages = nn.ModuleList([
            nn.Sequential(*[Block(widths[r], mids[r], widths[r], True, depth, r)
                            for _ in range(blocks[r])]) for r in self.resolutions])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, kept = self.stem(x), []
        for r, shift, stage in zip(self.resolutions, self.shifts, self.stages, strict=True):
            h = stage(shift(resize(h, r)))
            kept.append(h.flatten(1))
        return torch.cat(kept, dim=1)


@dataclass
class Pass:
    """What one top-down pass found: the layers' samples (flat, top first), and per layer
    log q(z_l | x, z_<l), log p(z_l | z_<l) and KL(q_l || p_l) at the drawn z_<l, each [N]
    (q's empty when the pass had no posterior); ``out`` the likelihood's parameters."""

    z: torch.Tensor
    out: torch.Tensor
    log_q: list[torch.Tensor] = field(default_factory=list)
    log_p: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    scale: list[torch.Tensor] = field(default_factory=list)  # q's standard deviations, flat


class TopDown(nn.Module):
    """The decoder: the top-down path (prior, posterior and generator together)."""

    def __init__(self, c_out: int, size: int, widths: dict[int, int], mids: dict[int, int],
                 zdim: int, layers: dict[int, int]):
        super().__init__()
        self.size, self.zdim, self.widths = size, zdim, widths
        self.at = [r for r in sorted(layers) for _ in range(layers[r])]
        self.sizes = [zdim * r * r for r in self.at]  # each layer's share of the flat z
        self.latent_dim = sum(self.sizes)
        # the encoder's row holds its resolutions highest first; where each one starts
        spans = {r: widths[r] * r * r for r in sorted(widths, reverse=True)}
        starts = [0, *torch.tensor(list(spans.values())).cumsum(0).tolist()[:-1]]
        self.enc_slices = {r: (s, spans[r]) for r, s in zip(spans, starts, strict=True)}
        order, depth = sorted(widths), len(self.at)
        # where the state arrives at a resolution: its width changed, a learned map added
        self.shifts = nn.ModuleList([widen(widths[prev], widths[r]) for prev, r
                                     in zip([order[0], *order[:-1]], order, strict=True)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(1, widths[r], r, r))
                                      for r in order])
        self.prior = nn.ModuleList([Block(widths[r], mids[r], 2 * zdim + widths[r], False,
                                          res=r) for r in self.at])
        self.post = nn.ModuleList([Block(2 * widths[r], mids[r], 2 * zdim, False, res=r)
                                   for r in self.at])
        self.proj = nn.ModuleList([nn.Conv2d(zdim, widths[r], 1) for r in self.at])
        self.blocks = nn.ModuleList([Block(widths[r], mids[r], widths[r], True, depth, r)
                                     for r in self.at])
        for conv in self.proj:  # the new z enters the state at 1 / sqrt(depth)
            conv.weight.data.mul_(1 / math.sqrt(depth))
        with torch.no_grad():  # the prior's own features start at zero, its z at N(0, I)
            for p in self.prior:
                p.convs[-1].weight.zero_()
                p.convs[-1].bias.zero_()
        self.out = nn.Conv2d(widths[order[-1]], c_out, 1)
        # the log-variance bounds of every layer's q and p: the posterior group's (set there)
        self.bounds = (-30.0, 20.0)
        self._kept: Pass | None = None

    def keep(self, found: Pass) -> None:
        """The pass of the latest sample: its log p and output are read from it, not redone."""
        self._kept = found

    def kept(self, z: torch.Tensor) -> Pass | None:
        """The kept pass if it drew exactly this z."""
        k = self._kept
        return k if k is not None and drew(k, z) else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters for given z's [N, latent_dim]."""
        found = self.kept(z) or self.run(len(z), given=z)
        return found.out

    def run(self, n: int, enc: torch.Tensor | None = None, given: torch.Tensor | None = None,
            noise: Callable[[int], torch.Tensor] | None = None, temperature: float = 1.0,
            keep: int = 0) -> Pass:
        """One top-down pass over n rows. Layer l's z is, in this order: the given one (for
        l < keep when sampling, or every layer without ``noise``), drawn from q when ``enc``
        is given (the encoder's rows, repeated to n), else drawn from p with its standard
        deviation times ``temperature``. ``noise(width)`` gives the standard normal draws."""
        self._kept, bounds = None, self.bounds
        arrive = dict(zip(sorted(self.widths), zip(self.shifts, self.bias, strict=True),
                          strict=True))
        h = torch.zeros_like(self.bias[0]).expand(n, -1, -1, -1)
        found = Pass(z=torch.empty(0), out=torch.empty(0))
        zs, offset = [], 0
        for i, r in enumerate(self.at):
            w = self.widths[r]
            if i == 0 or r != self.at[i - 1]:
                shift, bias = arrive[r]
                h = shift(resize(h, r)) + bias
            mu_p, logvar_p, feat = self.prior[i](h).split([self.zdim, self.zdim, w], 1)
            p = gaussian(mu_p, logvar_p, bounds)
            q = None
            if enc is not None:
                start, span = self.enc_slices[r]
                e = enc[:, start:start + span].view(n, w, r, r)
                q = gaussian(*self.post[i](torch.cat([h, e], 1)).chunk(2, 1), bounds)
            part = slice(offset, offset + self.sizes[i])
            if given is not None and (noise is None or i < keep):
                z = given[:, part].view(n, self.zdim, r, r)
            else:
                eps = noise(self.sizes[i]).view(n, self.zdim, r, r)
                z = q.loc + q.scale * eps if q is not None else \
                    p.loc + temperature * p.scale * eps
            offset += self.sizes[i]
            found.log_p.append(p.log_prob(z).flatten(1).sum(1))
            if q is not None:
                found.log_q.append(q.log_prob(z).flatten(1).sum(1))
                found.kl.append(torch.distributions.kl_divergence(q, p).flatten(1).sum(1))
                found.scale.append(q.scale.flatten(1))
            zs.append(z.flatten(1))
            h = self.blocks[i](h + feat + self.proj[i](z))
        found.z = torch.cat(zs, 1)
        found.out = self.out(resize(h, self.size))
        return found


def drew(found: Pass, z: torch.Tensor) -> bool:
    """Whether z is the sample this pass drew: the same tensor, or a view of it with the
    same rows ([k, B, D] of a pass over k x B rows)."""
    a = found.z
    return z.data_ptr() == a.data_ptr() and z.numel() == a.numel() and z.dtype == a.dtype


def gaussian(mu: torch.Tensor, logvar: torch.Tensor,
             bounds: tuple[float, float]) -> torch.distributions.Normal:
    """N(mu, exp(logvar)), logvar clamped; unvalidated, as priors.diagonal_normal: the
    checks would sync with the device twice a layer, on every pass."""
    return torch.distributions.Normal(mu.float(), torch.exp(0.5 * logvar.float().clamp(*bounds)),
                                      validate_args=False)


def build(latent_dim: int = 16, width: int | list[int] = 64, bottleneck: float = 0.25,
          resolutions: tuple[int, ...] = (4, 8, 16), layers: tuple[int, ...] = (2, 2, 2),
          enc_blocks: int | list[int] = 2, conditional: bool = False, *,
          shape: tuple[int, int, int], out_mult: int = 1) -> Networks:
    """``latent_dim``: channels of each layer's z; ``resolutions``: the maps' sizes, lowest
    first; ``layers``: stochastic layers at each; ``width`` and ``enc_blocks``: the blocks'
    channels and the encoder's blocks at each resolution (one value for all, or one per
    resolution, lowest first)."""
    if conditional:
        raise UserError("model=vdvae has no conditional form yet; use model=mlp, conv or "
                        "resnet with model.conditional=true")
    c, h, w = image_shape(shape, "vdvae")
    resolutions = [int(r) for r in resolutions]
    if h != w:
        raise UserError(f"model=vdvae needs square images, not {h}x{w}")
    if sorted(set(resolutions)) != resolutions or not resolutions or resolutions[0] < 1 \
            or resolutions[-1] > h:
        raise UserError(f"model.resolutions={resolutions} must increase, from 1 up to the "
                        f"image size {h}")
    per = {key: per_resolution(key, value, resolutions)
           for key, value in (("layers", layers), ("width", width), ("enc_blocks", enc_blocks))}
    if latent_dim < 1 or not 0 < bottleneck <= 1:
        raise UserError(f"model.latent_dim must be >= 1 and model.bottleneck in (0, 1] (got "
                        f"{latent_dim}, {bottleneck})")
    mids = {r: max(1, int(v * bottleneck)) for r, v in per["width"].items()}
    decoder = TopDown(c * out_mult, h, per["width"], mids, latent_dim, per["layers"])
    encoder = Encoder(c, per["width"], mids, per["enc_blocks"])
    return Networks(encoder, decoder, topdown=decoder)


def per_resolution(key: str, value: object, resolutions: list[int]) -> dict[int, int]:
    """model.<key>: one count >= 1, or one for each resolution (lowest first)."""
    values = list(value) if isinstance(value, list | tuple) else [value] * len(resolutions)
    if len(values) != len(resolutions) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise UserError(f"model.{key}={value} needs one count >= 1 for each of "
                        f"model.resolutions={resolutions} (or one for all)")
    return dict(zip(resolutions, values, strict=True))
