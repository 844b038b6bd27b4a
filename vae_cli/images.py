"""Picture grids written during training and by `vae sample`."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from vae_cli.model import VAE


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    save_image(images.float().cpu(), path, nrow=nrow, padding=2, pad_value=0.5)
    return path


@torch.no_grad()
def save_reconstructions(model: VAE, x: torch.Tensor, path: Path, per_row: int = 8) -> Path:
    """Rows alternate: inputs, then their reconstructions directly below."""
    n = (len(x) // per_row) * per_row or len(x)
    x = x[:n]
    rec = model.reconstruct(x)
    pairs = torch.stack([x.view(-1, per_row, *x.shape[1:]), rec.view(-1, per_row, *x.shape[1:])],
                        dim=1)
    return save_grid(pairs.reshape(-1, *x.shape[1:]), path, nrow=per_row)


@torch.no_grad()
def save_samples(model: VAE, z: torch.Tensor, path: Path) -> torch.Tensor:
    images = model.generate(z)
    save_grid(images, path)
    return images
