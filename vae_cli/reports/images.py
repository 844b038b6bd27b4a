"""Picture grids written during training and by `vae sample`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vae_cli.objective.model import VAE


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    from torchvision.utils import save_image  # torchvision takes a second to import

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    save_image(images.float().cpu(), path, nrow=nrow, padding=2, pad_value=0.5)
    return path


@torch.no_grad()
def reconstruction_rows(model: VAE, x: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Rows alternate: inputs, then their reconstructions directly below."""
    n = (len(x) // per_row) * per_row or len(x)
    per_row = min(per_row, n)
    x = x[:n]
    rec = model.reconstruct(x)
    pairs = torch.stack([x.view(-1, per_row, *x.shape[1:]), rec.view(-1, per_row, *x.shape[1:])],
                        dim=1)
    return pairs.reshape(-1, *x.shape[1:])


def save_reconstructions(model: VAE, x: torch.Tensor, path: Path, per_row: int = 8) -> Path:
    return save_grid(reconstruction_rows(model, x, per_row), path, nrow=min(per_row, len(x)))


@torch.no_grad()
def save_samples(model: VAE, z: torch.Tensor, path: Path) -> torch.Tensor:
    images = model.generate(z)
    save_grid(images, path)
    return images


@torch.no_grad()
def save_interpolations(model: VAE, x: torch.Tensor, path: Path, pairs: int = 8,
                        steps: int = 10) -> Path:
    """One row per pair of examples: input a, decoded (1-t) mu_a + t mu_b for t in [0, 1],
    input b. Linear in the posterior means, the usual latent-space homotopy."""
    pairs = max(1, min(pairs, len(x) // 2))
    a, b = x[:pairs], x[pairs:2 * pairs]
    z = model.interpolate(a, b, steps)  # [pairs, steps, D]
    dec = model.generate(z.reshape(-1, z.shape[-1])).view(pairs, steps, *x.shape[1:])
    rows = torch.cat([a.unsqueeze(1), dec, b.unsqueeze(1)], dim=1)
    return save_grid(rows.reshape(-1, *x.shape[1:]), path, nrow=steps + 2)


@torch.no_grad()
def save_traversals(model: VAE, x: torch.Tensor, order: list[int], scale: torch.Tensor,
                    path: Path, steps: int = 11, span: float = 3.0,
                    max_dims: int = 16) -> Path:
    """One row per latent dimension (in the given order, e.g. by KL): the posterior mean of
    one example with that dimension swept over +-span of its aggregate standard deviation."""
    base = model.posterior(x[:1]).mean[0]
    dims = order[:max_dims]
    offsets = torch.linspace(-span, span, steps, device=x.device)
    z = base.repeat(len(dims), steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = base[d] + offsets * scale[d]
    images = model.generate(z.view(-1, z.shape[-1]))
    return save_grid(images, path, nrow=steps)
