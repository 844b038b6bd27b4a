"""Picture grids written during training and by `vae sample`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import mean_of


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    from torchvision.utils import save_image  # torchvision takes a second to import

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    save_image(images.float().cpu(), path, nrow=nrow, padding=2, pad_value=0.5)
    return path


@torch.no_grad()
def reconstruction_rows(model: VAE, x: torch.Tensor, per_row: int = 8,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """Rows alternate: inputs, then their reconstructions directly below (each decoded with
    its own label, for a conditional model)."""
    n = (len(x) // per_row) * per_row or len(x)
    per_row = min(per_row, n)
    x = x[:n]
    rec = model.reconstruct(x, None if labels is None else labels[:n])
    pairs = torch.stack([x.view(-1, per_row, *x.shape[1:]), rec.view(-1, per_row, *x.shape[1:])],
                        dim=1)
    return pairs.reshape(-1, *x.shape[1:])


def save_reconstructions(model: VAE, x: torch.Tensor, path: Path, per_row: int = 8,
                         labels: torch.Tensor | None = None) -> Path:
    return save_grid(reconstruction_rows(model, x, per_row, labels), path,
                     nrow=min(per_row, len(x)))


def sample_draws(model: VAE, n: int, label: int | None = None) -> int:
    """How many prior draws make a grid of about n images: n, or, for a conditional model
    without a fixed label, ceil(n / classes), each decoded under every class."""
    if not model.conditional or label is not None:
        return n
    return max(1, math.ceil(n / model.num_classes))


@torch.no_grad()
def decode_samples(model: VAE, z: torch.Tensor, label: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Images of the prior draws z, their labels and the grid's row length. A conditional
    model decodes every z under ``label``, or, when None, under every class: one row per
    class, the same z in each column (the picture of Sohn et al. 2015)."""
    if not model.conditional:
        return model.generate(z), None, None
    if label is not None:
        y = torch.full((len(z),), label, dtype=torch.long, device=z.device)
        return model.generate(z, y=y), y, None
    y = torch.arange(model.num_classes, device=z.device).repeat_interleave(len(z))
    return model.generate(z.repeat(model.num_classes, 1), y=y), y, len(z)


@torch.no_grad()
def save_samples(model: VAE, z: torch.Tensor, path: Path, label: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoded prior draws as a grid (see decode_samples); returns images and labels."""
    images, labels, nrow = decode_samples(model, z, label)
    save_grid(images, path, nrow)
    return images, labels


def blend(model: VAE, ya: torch.Tensor | None, yb: torch.Tensor | None,
          steps: int) -> torch.Tensor | None:
    """Labels along an interpolation, [pairs * steps, C]: the one-hot of a's class moving
    linearly to b's, so each end is decoded under its own class (None: unconditional)."""
    if ya is None or yb is None:
        return None
    a, b = model.one_hot(ya), model.one_hot(yb)
    t = torch.linspace(0, 1, steps, device=a.device).view(1, -1, 1)
    return ((1 - t) * a.unsqueeze(1) + t * b.unsqueeze(1)).reshape(-1, a.shape[-1])


@torch.no_grad()
def save_interpolations(model: VAE, x: torch.Tensor, path: Path, pairs: int = 8,
                        steps: int = 10, labels: torch.Tensor | None = None) -> Path:
    """One row per pair of examples: input a, decoded (1-t) mu_a + t mu_b for t in [0, 1],
    input b. Linear in the posterior means, the usual latent-space homotopy; a conditional
    model's label moves from a's class to b's along the row."""
    pairs = max(1, min(pairs, len(x) // 2))
    a, b = x[:pairs], x[pairs:2 * pairs]
    ya, yb = (None, None) if labels is None else (labels[:pairs], labels[pairs:2 * pairs])
    z = model.interpolate(a, b, steps, ya, yb)  # [pairs, steps, D]
    y = blend(model, ya, yb, steps)
    dec = model.generate(z.reshape(-1, z.shape[-1]), y=y).view(pairs, steps, *x.shape[1:])
    rows = torch.cat([a.unsqueeze(1), dec, b.unsqueeze(1)], dim=1)
    return save_grid(rows.reshape(-1, *x.shape[1:]), path, nrow=steps + 2)


@torch.no_grad()
def save_traversals(model: VAE, x: torch.Tensor, order: list[int], scale: torch.Tensor,
                    path: Path, steps: int = 11, span: float = 3.0, max_dims: int = 16,
                    labels: torch.Tensor | None = None) -> Path:
    """One row per latent dimension (in the given order, e.g. by KL): the posterior mean of
    one example with that dimension swept over +-span of its aggregate standard deviation,
    decoded under that example's label for a conditional model."""
    y = None if labels is None else labels[:1]
    base = mean_of(model.posterior(x[:1], y))[0]
    dims = order[:max_dims]
    offsets = torch.linspace(-span, span, steps, device=x.device)
    z = base.repeat(len(dims), steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = base[d] + offsets * scale[d]
    ys = None if y is None else y.expand(len(dims) * steps)
    images = model.generate(model.prior.settle(z.view(-1, z.shape[-1])), y=ys)
    return save_grid(images, path, nrow=steps)
