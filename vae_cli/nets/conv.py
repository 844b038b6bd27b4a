"""DCGAN-style convolutional encoder/decoder for square images (28, 32, 64, ...)."""

from __future__ import annotations

from torch import nn

from vae_cli.errors import UserError
from vae_cli.nets import Networks, image_shape, joined, label_classes
from vae_cli.nets.mlp import Unflatten


def _plan(size: int) -> list[int]:
    """Spatial sizes after each stride-2 conv: halve while even and above 4.

    28 -> 14 -> 7, 32 -> 16 -> 8 -> 4, 64 -> ... -> 4: one rule covers MNIST, CIFAR and
    dSprites/CelebA sizes without padding the input.
    """
    sizes = [size]
    while sizes[-1] % 2 == 0 and sizes[-1] > 4:
        sizes.append(sizes[-1] // 2)
    return sizes


def build(latent_dim: int = 10, channels: int = 32, max_channels: int = 256,
          fc_hidden: int = 256, conditional: bool = False, halvings: int | None = None, *,
          shape: tuple[int, int, int], out_mult: int = 1, num_classes: int | None = None,
          posterior_outputs: int | None = None, spatial: bool = False) -> Networks:
    """Conv(4, stride 2) blocks doubling channels, a hidden linear layer, then 2z outputs.

    Conditional: the one-hot class joins the flattened conv features, before the hidden
    layer (rather than as C constant channels at full resolution: the label is global, so it
    enters where the features are, at no cost per pixel), and z at the decoder's input.
    ``spatial`` (a quantised latent): the encoder ends in a 1x1 conv to
    ``posterior_outputs`` channels and keeps its map; the decoder starts from such a map."""
    c, h, w = image_shape(shape, "conv")
    if h != w:
        raise UserError(f"model=conv needs square images, got {h}x{w}; use model=mlp")
    sizes = plan(h, halvings, "conv")
    if channels <= 0 or fc_hidden <= 0:
        raise UserError("model.channels and model.fc_hidden must be positive")
    widths = [min(channels * 2**i, max_channels) for i in range(len(sizes) - 1)]
    enc: list[nn.Module] = []
    n_in = c
    for n_out in widths:
        enc += [nn.Conv2d(n_in, n_out, 4, 2, 1), nn.ReLU()]
        n_in = n_out
    rev = widths[::-1]
    dec: list[nn.Module] = []
    for i, n_in in enumerate(rev):
        last = i == len(rev) - 1
        dec.append(nn.ConvTranspose2d(n_in, c * out_mult if last else rev[i + 1], 4, 2, 1))
        if not last:
            dec.append(nn.ReLU())
    if spatial:
        return spatial_networks(enc, dec, widths[-1], sizes[-1], posterior_outputs)
    flat, k = widths[-1] * sizes[-1] ** 2, label_classes(conditional, num_classes)
    head = nn.Linear(fc_hidden, posterior_outputs or 2 * latent_dim)
    encoder = joined([*enc, nn.Flatten()], [nn.Linear(flat + k, fc_hidden), nn.ReLU(), head], k)
    front: list[nn.Module] = [nn.Linear(latent_dim + k, fc_hidden), nn.ReLU(),
                              nn.Linear(fc_hidden, flat), nn.ReLU(),
                              Unflatten((widths[-1], sizes[-1], sizes[-1]))]
    return Networks(encoder, joined([], front + dec, k), classes=k)


def plan(size: int, halvings: int | None, model: str) -> list[int]:
    """_plan's sizes, cut to ``halvings`` stride-2 stages when given."""
    sizes = _plan(size)
    if halvings is not None:
        if not 2 <= halvings < len(sizes):
            raise UserError(f"model.halvings={halvings} must be in [2, {len(sizes) - 1}] for "
                            f"{size}x{size} images")
        sizes = sizes[:halvings + 1]
    if len(sizes) < 3:
        raise UserError(f"model={model} needs images of at least 16x16 that halve twice, got "
                        f"{size}x{size}; use model=mlp")
    return sizes


def spatial_networks(enc: list[nn.Module], dec: list[nn.Module], width: int, size: int,
                     channels: int | None) -> Networks:
    """Networks around a latent map [channels, size, size]: the conv stacks ``enc`` (ending
    in ``width`` channels) and ``dec`` (starting from them), joined to the map by convs.
    They read no class (rules.py refuses a conditional quantised latent)."""
    if not channels:
        raise ValueError("a spatial latent needs its number of channels")
    encoder = nn.Sequential(*enc, nn.Conv2d(width, channels, 1))
    decoder = nn.Sequential(Unflatten((channels, size, size)),
                            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), *dec)
    return Networks(encoder, decoder, grid=(size, size))
