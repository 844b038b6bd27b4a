"""LPIPS (Zhang et al. 2018), the perceptual distance of image autoencoders: VGG16
features at five layers, unit-normalised per channel, squared differences weighted by
learned 1x1 heads, averaged over positions and summed over layers; images in [-1, 1].

The network is the ``lpips`` package's own (``pip install 'vae-cli[ldm]'``), with its
weights from one of two places:
- ``torchvision``: VGG16's ImageNet weights through torchvision's weights API (downloaded
  once into torch's cache) and the learned heads the lpips package ships;
- a file: a whole LPIPS state dict (trunk and heads), for a machine without internet.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vae_cli.errors import UserError, one_line

TORCHVISION = "torchvision"


def lpips_network(weights: str) -> nn.Module:
    """The frozen LPIPS(VGG) network, in eval mode."""
    try:
        import lpips
    except ImportError:
        raise UserError("LPIPS needs the lpips package: pip install 'vae-cli[ldm]'") from None
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated pretrained=
        warnings.simplefilter("ignore")
        if weights == TORCHVISION:
            try:
                net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=False, verbose=False)
            except Exception as e:  # noqa: BLE001 - offline: the download's own error
                raise UserError(f"LPIPS could not get VGG16's ImageNet weights from "
                                f"torchvision ({one_line(e)}); give a file of an LPIPS "
                                "state dict instead") from None
        else:
            net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
            load_state(net, Path(weights).expanduser())
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def load_state(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"LPIPS weights {path} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file: one line
        raise UserError(f"{path} is not an LPIPS(VGG) state dict ({one_line(e)})") from None


def lpips_distance(net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] distances between images in [0, 1] [B, C, H, W] (grey images as RGB)."""
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    return net(a * 2 - 1, b * 2 - 1).flatten()
