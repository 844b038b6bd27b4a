"""`vae sample`: prior samples from a checkpoint (images, or lines of text for a sequence
model), plus the run's picture set."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli.config.build import load_data, load_trained
from vae_cli.config.schemas import validate_sample
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError
from vae_cli.reports.images import save_samples
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
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        z = model.prior.sample(cfg.num_samples)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else checkpoint.run_dir_of(cfg.ckpt)
    vocab = Vocab.from_state(ckpt.get("vocab"))
    if vocab:  # a sequence model: lines of text, printed and written
        text = sample_text(model, vocab, z, float(cfg.temperature))
        print(text, end="")
        main = write_text(out_dir / f"samples_seed{cfg.seed}.txt", text)
        written = [main]
    else:
        main = out_dir / f"samples_seed{cfg.seed}.png"
        images = save_samples(model, z, main)
        torch.save({"images": images.cpu(), "z": z.cpu()}, main.with_suffix(".pt"))
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
