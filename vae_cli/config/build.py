"""Builds the runtime objects (device, model, optimizer) from a validated config."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

from vae_cli.config.components import instantiate
from vae_cli.errors import UserError
from vae_cli.objective.model import VAE
from vae_cli.tokens import Vocab


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


def build_model(cfg: DictConfig, shape: tuple[int, ...], dataset_size: int,
                vocab_size: int | None = None) -> VAE:
    """Instantiate the components and check, before any work, that they fit together.
    ``shape`` is (C, H, W) for images and (L,) for token sequences of a ``vocab_size``."""
    shape = tuple(shape)
    runtime = {"shape": shape, "latent_dim": int(cfg.model.latent_dim),
               "dataset_size": int(dataset_size), "vocab_size": vocab_size}
    likelihood = instantiate(cfg.loss, **runtime)
    encoder, decoder = instantiate(cfg.model, out_mult=likelihood.out_mult, **runtime)
    if len(shape) == 1 and not likelihood.tokens:
        raise UserError(f"loss={type(likelihood).__name__.lower()} scores images; token "
                        "sequences need loss=categorical")
    # A VampPrior's pseudo-inputs live where the encoder reads continuous input: pixels in
    # [0, 1], or, for a sequence encoder, unbounded embedded sequences.
    soft = getattr(encoder, "soft_shape", None)
    prior = instantiate(cfg.prior, **{**runtime, **({"shape": soft, "bounded": False}
                                                      if soft else {})})
    divergence = instantiate(cfg.divergence, **runtime)
    schedule = instantiate(cfg.schedule, **runtime)
    iw = int(cfg.trainer.iw_samples)
    if iw > 1 and not divergence.bounds_likelihood:
        raise UserError(f"trainer.iw_samples={iw} needs a likelihood bound; "
                        f"divergence={type(divergence).__name__} is not one: use divergence=kl")
    model = VAE(encoder, decoder, prior, divergence, likelihood, runtime["latent_dim"],
                schedule, iw)
    divergence.check(prior)  # after VAE() bound the encoder to a VampPrior
    return model


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.name]
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
               eps=cfg.eps)


def autocast(device: torch.device, precision: str):
    """Mixed precision context; fp32 is a no-op. Likelihoods cast back to fp32 themselves."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()  # entered every step: skip autocast's own bookkeeping
    return torch.autocast(device.type, dtype=dtype)


def load_model(path: str, device: torch.device) -> tuple[VAE, dict]:
    """Rebuild a model from a checkpoint's own config (not today's defaults)."""
    from omegaconf import OmegaConf

    from vae_cli.config.components import validate
    from vae_cli.runtime import checkpoint

    ckpt = checkpoint.load(path)
    cfg = validate(OmegaConf.create(ckpt["config"]))
    vocab = Vocab.from_state(ckpt.get("vocab"))
    model = build_model(cfg, tuple(ckpt["shape"]), ckpt.get("dataset_size", 1),
                        len(vocab) if vocab else None)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not match its own config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


def load_data(ckpt: dict, overrides, device: torch.device):
    """The dataset a checkpoint was trained on (its own config, with non-null command-line
    keys such as dataset.root laid over it), on the given device."""
    from vae_cli.config.components import dataset_config

    # Text is encoded with the checkpoint's own vocabulary, never one rebuilt from the file.
    node = dataset_config(ckpt["config"]["dataset"], overrides)
    vocab = Vocab.from_state(ckpt.get("vocab"))
    return instantiate(node, vocab=vocab.itos if vocab else None).to(device)
