"""`vae sample`: prior samples from a checkpoint, as a PNG grid and a tensor file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli import checkpoint
from vae_cli.build import load_model, resolve_device
from vae_cli.errors import UserError
from vae_cli.images import save_samples

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    if not isinstance(cfg.num_samples, int) or cfg.num_samples <= 0:
        raise UserError(f"num_samples={cfg.num_samples!r} must be a positive integer")
    model, _ = load_model(cfg.ckpt, resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        z = model.prior.sample(cfg.num_samples)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.run_dir_of(cfg.ckpt)
    png = out_dir / f"samples_seed{cfg.seed}.png"
    images = save_samples(model, z, png)
    torch.save({"images": images.cpu(), "z": z.cpu()}, png.with_suffix(".pt"))
    print(f"wrote {png} and {png.with_suffix('.pt')} ({cfg.num_samples} samples)")
    return png
