"""The autoencoder of latent diffusion (Rombach et al. 2022, "KL-f8"; diffusers'
``AutoencoderKL``): ResNet blocks with GroupNorm and SiLU at each resolution, a mid-block
with self-attention, halving the image ``len(ch_mult) - 1`` times to a latent map of
``latent_dim`` channels (4 by default: a 256 px image becomes 4 x 32 x 32).

The networks are diffusers' own ``Encoder`` and ``Decoder`` (with the 1x1 ``quant_conv``
and ``post_quant_conv`` around the latent), built from an ``AutoencoderKL`` config, so a
trained model is an ``AutoencoderKL`` as the ecosystem loads it (``vae export
format=diffusers``), and one of those starts training here (``model.init_from``). As
there, the networks read and write images in [-1, 1]; this module maps vae's [0, 1] at
both ends. z is the latent map flattened [C x H/f x W/f], so the posterior, the KL (summed
over the map), the priors and the IWAE bound treat it as any z.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vae_cli.errors import UserError, one_line
from vae_cli.nets import Networks, image_shape


def require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise UserError("model=ldm needs the diffusers package: pip install "
                        "'vae-cli[ldm]'") from None
    return diffusers


class LDMEncoder(nn.Module):
    """x in [0, 1] [B, C, H, W] -> [B, 2 x latent x h x w]: mean map, then log-variance map."""

    def __init__(self, encoder: nn.Module, quant_conv: nn.Module):
        super().__init__()
        self.encoder, self.quant_conv = encoder, quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x * 2 - 1)).flatten(1)


class LDMDecoder(nn.Module):
    """z [B, latent x h x w] -> the likelihood's parameters [B, C x out_mult, H, W], the
    image mean in [0, 1] units."""

    def __init__(self, autoencoder: nn.Module, grid: tuple[int, int, int],
                 config: dict[str, Any]):
        super().__init__()
        self.post_quant_conv, self.decoder = autoencoder.post_quant_conv, autoencoder.decoder
        self.grid, self.factor = grid, 2 ** (len(config["block_out_channels"]) - 1)
        self.config = config  # the AutoencoderKL these networks are (vae export)
        # the same modules as one AutoencoderKL, for its tiling (kept out of the state dict)
        self.__dict__["autoencoder"] = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.post_quant_conv(z.reshape(z.shape[0], *self.grid))
        return (self.decoder(h) + 1) / 2

    def tiled(self, tile: int) -> nn.Module:
        """The AutoencoderKL of these modules with diffusers' tiling on: an image larger
        than ``tile`` px (a latent map larger than tile / f) is encoded (decoded) in
        overlapping tiles of that size, blended at the seams, so memory stays that of one
        tile and each tile is seen at the size the networks trained on."""
        if tile % (4 * self.factor):
            raise UserError(f"a tile of {tile} px must be a multiple of 4 x {self.factor} "
                            "(the overlap is a quarter of a tile, in whole latents)")
        ae = self.autoencoder
        ae.enable_tiling()
        ae.tile_sample_min_size, ae.tile_latent_min_size = tile, tile // self.factor
        return ae


def tile_for(decoder: nn.Module, tile: int | None, key: str, size: int) -> int:
    """The tile size for a model asked (by ``key``) for images of ``size`` px: the
    training size unless given; one line for a model or a size that cannot be."""
    if not isinstance(decoder, LDMDecoder):
        raise UserError(f"{key} needs model=ldm, whose convolutional networks read and "
                        "write images of any size")
    if size % decoder.factor:
        raise UserError(f"{key}={size} is not a multiple of the model's factor "
                        f"{decoder.factor}")
    tile = tile if tile is not None else decoder.config["sample_size"]
    decoder.tiled(tile)  # a tile that cannot overlap in whole latents: refused here
    return tile


@torch.no_grad()
def reconstruct_any_size(decoder: LDMDecoder, x: torch.Tensor, tile: int) -> torch.Tensor:
    """The decoder's output [B, C', H, W] ([0, 1] units) for the posterior means of images
    x [B, C, H, W] of any size that is a multiple of f, tiled beyond ``tile`` px."""
    ae = decoder.tiled(tile)
    mean = ae.encode(x * 2 - 1).latent_dist.mean
    return (ae.decode(mean).sample + 1) / 2


@torch.no_grad()
def decode_any_size(decoder: LDMDecoder, z: torch.Tensor, tile: int) -> torch.Tensor:
    """The decoder's output for latent maps z [B, latent, h, w] of any size."""
    return (decoder.tiled(tile).decode(z).sample + 1) / 2


def autoencoder_config(c: int, out_channels: int, size: int, latent_dim: int, ch: int,
                       ch_mult: list[int], num_res_blocks: int, norm_groups: int
                       ) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of these settings."""
    levels = len(ch_mult)
    return {"in_channels": c, "out_channels": out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [ch * m for m in ch_mult],
            "layers_per_block": num_res_blocks, "act_fn": "silu",
            "latent_channels": latent_dim, "norm_num_groups": norm_groups,
            "sample_size": size}


def build(latent_dim: int = 4, ch: int = 128, ch_mult: list[int] = (1, 2, 4, 4),
          num_res_blocks: int = 2, norm_groups: int = 32, init_from: str | None = None,
          conditional: bool = False, *, shape: tuple[int, int, int], out_mult: int = 1,
          num_classes: int | None = None, posterior_outputs: int | None = None,
          spatial: bool = False) -> Networks:
    c, h, w = image_shape(shape, "ldm")
    ch_mult = list(ch_mult)
    factor = 2 ** (len(ch_mult) - 1)
    check(ch, ch_mult, num_res_blocks, norm_groups, h, w, factor, spatial, conditional)
    if posterior_outputs not in (None, 2 * latent_dim):
        raise UserError(f"model=ldm keeps a Gaussian map of 2 x {latent_dim} channels; this "
                        "posterior needs another encoder output (use posterior=gaussian)")
    diffusers = require_diffusers()
    config = autoencoder_config(c, c * out_mult, h, latent_dim, ch, ch_mult, num_res_blocks,
                                norm_groups)
    ae = diffusers.AutoencoderKL(**config)
    if init_from is not None and not torch.empty(0).is_meta:  # a count needs no weights
        load_pretrained(ae, init_from, config)
    grid = (latent_dim, h // factor, w // factor)
    return Networks(LDMEncoder(ae.encoder, ae.quant_conv),
                    LDMDecoder(ae, grid, config), grid=grid[1:])


def check(ch: int, ch_mult: list[int], num_res_blocks: int, norm_groups: int, h: int, w: int,
          factor: int, spatial: bool, conditional: bool) -> None:
    if spatial:
        raise UserError("model=ldm keeps a Gaussian latent map; posterior=gaussian")
    if conditional:
        raise UserError("model=ldm is unconditional: leave model.conditional=false")
    if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
        raise UserError(f"model.ch_mult={ch_mult} must be positive integers, one per level")
    if ch < 1 or num_res_blocks < 1:
        raise UserError("model.ch and model.num_res_blocks must be positive")
    if norm_groups < 1 or any((ch * m) % norm_groups for m in ch_mult):
        raise UserError(f"model.norm_groups={norm_groups} must divide every width "
                        f"{[ch * m for m in ch_mult]} (model.ch x model.ch_mult)")
    if h % factor or w % factor:
        raise UserError(f"model=ldm halves the image {len(ch_mult) - 1} times (factor "
                        f"{factor}): {h}x{w} is not a multiple of it; change "
                        "dataset.image_size or model.ch_mult")


def load_pretrained(ae: nn.Module, folder: str, config: dict[str, Any]) -> None:
    """Weights of a diffusers AutoencoderKL folder (``save_pretrained``'s), whose
    architecture must be the one these settings build."""
    diffusers = require_diffusers()
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model.init_from={folder}: no config.json of a diffusers "
                        "AutoencoderKL there")
    try:
        theirs = diffusers.AutoencoderKL.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - a foreign or damaged folder: one line
        raise UserError(f"model.init_from={folder} cannot be loaded as a diffusers "
                        f"AutoencoderKL ({one_line(e)})") from None
    differ = [k for k in ("in_channels", "out_channels", "block_out_channels",
                          "layers_per_block", "latent_channels", "norm_num_groups")
              if list_or(theirs.config.get(k)) != list_or(config[k])]
    if differ:
        k = differ[0]
        raise UserError(f"model.init_from={folder} has {k}={theirs.config.get(k)}, these "
                        f"settings build {config[k]}: set the model's keys to match it")
    ae.load_state_dict(theirs.state_dict())


def list_or(v: Any) -> Any:
    return list(v) if isinstance(v, list | tuple) else v
