"""Evaluation: average loss terms over a split, in nats per example and bits per dim."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli import checkpoint
from vae_cli.batching import ordered
from vae_cli.build import autocast, load_model, resolve_device
from vae_cli.config import dataset_config, instantiate
from vae_cli.model import VAE, bits_per_dim

log = logging.getLogger(__name__)


def means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Device sums -> Python floats with a single host sync."""
    names = list(sums)
    return dict(zip(names, torch.stack([sums[k] for k in names]).div(count).tolist(),
                    strict=True))


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, batch_size: int, precision: str = "fp32") -> dict:
    """Example-weighted means of every term the model reports, with one host sync."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for xb in ordered(x, batch_size):
        with autocast(xb.device, precision):
            out = model(xb)
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * len(xb)
    model.train(was_training)
    result = means(sums, len(x))
    if model.divergence.bounds_likelihood:
        # recon + KL is the negative ELBO whatever beta trained it, so report it apart.
        result["nelbo"] = result["recon"] + result.get("kl", result["div"])
        result["bpd"] = bits_per_dim(result["nelbo"], math.prod(x.shape[1:]))
    return result


def write_report(result: dict, run_dir: Path, name: str = "eval.json") -> Path:
    path = Path(run_dir) / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(result: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(cfg: DictConfig) -> dict:
    """`vae eval`: rebuild the model from its checkpoint and score a split."""
    model, ckpt = load_model(cfg.ckpt, resolve_device(cfg.device))
    data = instantiate(dataset_config(ckpt["config"]["dataset"], cfg.get("dataset"))).to(
        next(model.parameters()).device)
    split = cfg.eval.split
    x = data.split(split)
    torch.manual_seed(cfg.seed)
    result = {"checkpoint": str(cfg.ckpt), "split": split, "examples": len(x),
              "epoch": ckpt.get("state", {}).get("epoch"),
              **evaluate(model, x, cfg.eval.batch_size)}
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.run_dir_of(cfg.ckpt)
    path = write_report(result, out_dir)
    print(table(result))
    log.info("wrote %s", path)
    return result
