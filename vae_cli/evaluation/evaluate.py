"""Evaluation: average loss terms over a split, in nats per example and bits per dim."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli.config.build import autocast, load_data, load_model, resolve_device
from vae_cli.data.batching import ordered
from vae_cli.errors import UserError
from vae_cli.evaluation.diagnostics import encode_all, iwae_bound, posterior_stats
from vae_cli.evaluation.disentangle import mig
from vae_cli.objective.model import VAE, per_unit
from vae_cli.runtime import checkpoint

log = logging.getLogger(__name__)
MAX_LOGITS = 2**26  # floats of decoder output held at once by `vae eval` (256 MB)


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
        result.update(per_unit(result["nelbo"], x))
    return result


def write_report(result: dict, run_dir: Path, name: str = "eval.json") -> Path:
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return " ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v)
    if isinstance(v, dict):
        return "  ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


SHOWN = ("split", "examples", "epoch", "loss", "recon", "div", "nelbo", "bpd", "nll_token",
         "ppl", "nll_iwae", "bpd_iwae", "nll_token_iwae", "ppl_iwae", "iw_samples",
         "active_units", "kl_per_dim", "mig", "mig_per_factor")


def table(result: dict) -> str:
    rows = [(k, _fmt(result[k])) for k in SHOWN if k in result]
    rows += [(k, _fmt(v)) for k, v in result.items()
             if k not in SHOWN and isinstance(v, float) and k not in ("checkpoint",)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(cfg: DictConfig) -> dict:
    """`vae eval`: rebuild the model from its checkpoint and score a split."""
    e = cfg.eval
    if e.split not in ("train", "val", "test"):
        raise UserError(f"eval.split={e.split!r} is not one of val, test, train")
    for key in ("batch_size", "iw_batch", "mig_bins"):
        if not isinstance(e[key], int) or e[key] <= 0:
            raise UserError(f"eval.{key}={e[key]!r} must be a positive integer")
    if not isinstance(e.iw_samples, int) or e.iw_samples < 0:
        raise UserError(f"eval.iw_samples={e.iw_samples!r} must be >= 0 (0 skips the bound)")
    model, ckpt = load_model(cfg.ckpt, resolve_device(cfg.device))
    data = load_data(ckpt, cfg.get("dataset"), next(model.parameters()).device)
    x, factors = data.split(e.split), data.factors.get(e.split)
    if e.max_examples:
        x = x[: e.max_examples]
        factors = None if factors is None else factors[: e.max_examples]
    batch, iw_batch = e.batch_size, e.iw_batch
    per = getattr(model.decoder, "out_numel", 0)
    if per:  # a sequence decoder's logits are L x V floats each: bound what is decoded at once
        batch, iw_batch = (max(1, min(b, MAX_LOGITS // per)) for b in (batch, iw_batch))
    torch.manual_seed(cfg.seed)
    result = {"checkpoint": str(cfg.ckpt), "split": e.split, "examples": len(x),
              "epoch": ckpt.get("state", {}).get("epoch"),
              **evaluate(model, x, batch)}
    if e.iw_samples:
        result.update(iwae_bound(model, x, e.iw_samples, batch, iw_batch))
    encoded = encode_all(model, x, batch)
    result.update(posterior_stats(model, x, batch, encoded=encoded))
    if factors is not None:
        result.update(mig(encoded[0], factors, e.mig_bins, data.factor_names))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.run_dir_of(cfg.ckpt)
    path = write_report(result, out_dir, f"eval_{e.split}.json" if e.split != "test"
                        else "eval.json")
    print(table(result))
    log.info("wrote %s", path)
    return result
