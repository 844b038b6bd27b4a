"""The pictures of a top-down hierarchy (model=vdvae), as its papers show them: prior
samples at lowered temperatures, and each layer's share of an image (the layers above l
kept from the posterior, the rest drawn from the prior)."""

from __future__ import annotations

from pathlib import Path

import torch

from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import mean_of
from vae_cli.reports.images import save_grid

TEMPERATURES = (1.0, 0.9, 0.8, 0.6, 0.4)


@torch.no_grad()
def save_temperatures(model: VAE, path: Path, per_row: int = 8) -> Path:
    """One row per temperature, every layer's standard deviation scaled by it."""
    rows = [model.likelihood.mean(model.decode(model.prior.sample(per_row, temperature=t)))
            for t in TEMPERATURES]
    return save_grid(torch.cat(rows), path, nrow=per_row)


@torch.no_grad()
def save_layer_resampling(model: VAE, x: torch.Tensor, path: Path, rows: int = 8,
                          draws: int = 1, temperature: float = 0.8) -> Path:
    """Per input (a row): the input, then columns l = 0 ... L: the posterior means of the
    layers above l kept, layers l and below drawn from the prior (l = L: the
    reconstruction)."""
    net, x = model.prior.net, x[:rows]
    z = mean_of(model.posterior(x))
    columns = [x]
    for keep in range(len(net.at) + 1):
        for _ in range(draws):
            found = net.run(len(x), given=z, keep=keep, temperature=temperature,
                            noise=lambda w: torch.randn(len(x), w, device=x.device))
            columns.append(model.likelihood.mean(found.out))
    grid = torch.stack(columns, 1).reshape(-1, *x.shape[1:])
    return save_grid(grid, path, nrow=len(columns))
