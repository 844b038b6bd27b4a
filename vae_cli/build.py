"""Builds the runtime objects (device, model, optimizer) from a validated config."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from vae_cli.config import instantiate
from vae_cli.errors import UserError
from vae_cli.model import VAE


def resolve_device(name: str) -> torch.device:
    """auto picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available; use trainer.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device=mps but MPS is not available; use trainer.device=cpu")
    return torch.device(name)


def build_model(cfg: DictConfig, shape: tuple[int, int, int]) -> VAE:
    """Instantiate the five components and check that they fit together."""
    latent_dim = int(cfg.model.latent_dim)
    likelihood = instantiate(cfg.loss)
    encoder, decoder = instantiate(cfg.model, shape=tuple(shape), out_mult=likelihood.out_mult)
    prior = instantiate(cfg.prior, latent_dim=latent_dim)
    divergence = instantiate(cfg.divergence)
    divergence.check(prior)
    return VAE(encoder, decoder, prior, divergence, likelihood, latent_dim)


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
               eps=cfg.eps)


def autocast(device: torch.device, precision: str):
    """Mixed precision context; fp32 is a no-op. Likelihoods cast back to fp32 themselves."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def load_model(path: str, device: torch.device) -> tuple[VAE, dict]:
    """Rebuild a model from a checkpoint's own config (not today's defaults)."""
    from omegaconf import OmegaConf

    from vae_cli import checkpoint
    from vae_cli.config import validate

    ckpt = checkpoint.load(path)
    cfg = validate(OmegaConf.create(ckpt["config"]))
    model = build_model(cfg, tuple(ckpt["shape"]))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not match its own config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt
