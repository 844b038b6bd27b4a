"""`vae sample`: prior samples from a checkpoint (images, or lines of text for a sequence
model), plus the run's picture set. A conditional model draws one class (``label=k``) or one
row per class."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli.config.build import load_data, load_trained
from vae_cli.config.schemas import validate_sample
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError
from vae_cli.objective.model import VAE
from vae_cli.reports.images import sample_draws, save_samples
from vae_cli.reports.pictures import write_curves, write_data_pictures
from vae_cli.reports.text import sample_text
from vae_cli.runtime import checkpoint
from vae_cli.runtime.device import resolve_device
from vae_cli.runtime.files import write_text

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    cfg = validate_sample(cfg)
    objective, ckpt = load_trained(cfg.ckpt, resolve_device(cfg.device))
    model = objective.model
    check_label(cfg.label, model)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        z = model.prior.sample(sample_draws(model, cfg.num_samples, cfg.label))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.run_dir_of(cfg.ckpt)
    vocab = Vocab.from_state(ckpt.get("vocab"))
    if vocab:  # a sequence model: lines of text, printed and written
        text = sample_text(model, vocab, z, float(cfg.temperature))
        print(text, end="")
        main = write_text(out_dir / f"samples_seed{cfg.seed}.txt", text)
        written = [main]
    else:
        main = out_dir / f"samples_seed{cfg.seed}.png"
        images, labels = save_samples(model, z, main, cfg.label)
        saved = {"images": images.cpu(), "z": z.cpu()}
        if labels is not None:  # image i is z[i % len(z)] decoded under labels[i]
            saved["labels"] = labels.cpu()
        torch.save(saved, main.with_suffix(".pt"))
        written = [main, main.with_suffix(".pt")]
    if cfg.pictures:
        # The other pictures need the data; without it the samples alone are still useful.
        try:
            data = load_data(ckpt, cfg.dataset, next(model.parameters()).device)
        except UserError as e:
            log.warning("samples only; data pictures skipped: %s", e)
        else:
            written += write_data_pictures(model, data, cfg.split, out_dir)
        curves = write_curves(checkpoint.run_dir_of(cfg.ckpt))
        written += [curves] if curves else []
    print("wrote " + ", ".join(str(p) for p in written))
    return main


def check_label(label: int | None, model: VAE) -> None:
    """label= names one of a conditional model's classes, or is not given."""
    if label is None:
        return
    if not model.conditional:
        raise UserError(f"label={label}: this model is not conditional (it was trained "
                        "without model.conditional=true); leave label out")
    if not 0 <= label < model.num_classes:
        raise UserError(f"label={label} is out of range: this model's classes are 0.."
                        f"{model.num_classes - 1}")
