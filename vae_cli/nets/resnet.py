"""Residual convolutional encoder/decoder for 32x32 and 64x64 images (any size _plan takes).

Each resolution has ``blocks`` pre-activation residual blocks, then a stride-2 conv (encoder)
or a stride-2 transposed conv (decoder). Group norm, not batch norm: batch statistics would
make a sample's encoding depend on its batch-mates, which IWAE and the likelihood estimates
assume it does not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vae_cli.errors import UserError
from vae_cli.nets import Networks, image_shape, joined, label_classes
from vae_cli.nets.conv import plan, spatial_networks
from vae_cli.nets.mlp import Unflatten


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(channels, 8)
        self.body = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(groups, channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        # Zero-init the last conv: each block starts as the identity, which keeps an
        # unnormalised residual stack stable at Adam's usual 1e-3 (Goyal et al. 2017).
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def build(latent_dim: int = 32, channels: int = 64, max_channels: int = 256, blocks: int = 1,
          conditional: bool = False, halvings: int | None = None, *,
          shape: tuple[int, int, int], out_mult: int = 1, num_classes: int | None = None,
          posterior_outputs: int | None = None, spatial: bool = False) -> Networks:
    """Conditional: the one-hot class joins the flattened features before the encoder's
    output layer (as in model=conv) and z at the decoder's input. ``spatial``: as in
    model=conv, the latent is the encoder's map."""
    c, h, w = image_shape(shape, "resnet")
    if h != w:
        raise UserError(f"model=resnet needs square images, got {h}x{w}; use model=mlp")
    sizes = plan(h, halvings, "resnet")
    if channels <= 0 or blocks < 0:
        raise UserError("model.channels must be positive and model.blocks >= 0")
    widths = [min(channels * 2**i, max_channels) for i in range(len(sizes))]
    enc: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, padding=1)]
    for i in range(len(sizes) - 1):
        enc += [ResBlock(widths[i]) for _ in range(blocks)]
        enc.append(nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1))
    dec: list[nn.Module] = []
    for i in range(len(sizes) - 1, 0, -1):
        dec += [ResBlock(widths[i]) for _ in range(blocks)]
        dec.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 4, 2, 1))
    dec += [nn.SiLU(), nn.Conv2d(widths[0], c * out_mult, 3, padding=1)]
    if spatial:
        return spatial_networks([*enc, nn.SiLU()], dec, widths[-1], sizes[-1],
                                posterior_outputs)
    flat, k = widths[-1] * sizes[-1] ** 2, label_classes(conditional, num_classes)
    head = nn.Linear(flat + k, posterior_outputs or 2 * latent_dim)
    encoder = joined([*enc, nn.SiLU(), nn.Flatten()], [head], k)
    front: list[nn.Module] = [nn.Linear(latent_dim + k, flat),
                              Unflatten((widths[-1], sizes[-1], sizes[-1]))]
    return Networks(encoder, joined([], front + dec, k), classes=k)
