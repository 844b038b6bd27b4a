"""`vae sample`: samples from a checkpoint (images, or lines of text for a sequence model),
plus the run's picture set. The draws come from the model's prior (``sampler=prior``) or
from a sampler fitted once to the training split's codes (``sampler=gmm | two_stage``,
saved in <run>/samplers/); ``fd.samples=N`` scores N of them with the Fréchet distance. A
conditional model draws one class (``label=k``) or one row per class. ``temperature``
tempers an image model's prior draws (every Gaussian's standard deviation times it) and a
text model's decoding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from vae_cli.config.build import build_sampler, dataset_root, load_data, load_trained
from vae_cli.config.schemas import validate_sample
from vae_cli.data.base import Splits
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError
from vae_cli.evaluation.features import extractor
from vae_cli.evaluation.frechet import fd_score
from vae_cli.nets.ldm import decode_any_size, tile_for
from vae_cli.objective.model import VAE
from vae_cli.objective.priors import NormalPrior
from vae_cli.reports.images import sample_draws, save_grid, save_samples
from vae_cli.reports.pictures import write_curves, write_data_pictures
from vae_cli.reports.text_outputs import sample_text
from vae_cli.runtime.device import resolve_device
from vae_cli.runtime.files import write_text
from vae_cli.runtime.run_folder import RunFolder
from vae_cli.samplers.fitted import fitted_sampler

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    cfg = validate_sample(cfg)
    objective, ckpt = load_trained(cfg.ckpt, resolve_device(cfg.device))
    model = objective.model
    check_label(cfg.label, model)
    vocab = Vocab.from_state(ckpt.get("vocab"))
    if vocab and cfg.fd.samples:
        raise UserError(f"fd.samples={cfg.fd.samples}: the Fréchet distance scores images, "
                        "and this is a text model; leave fd.samples=0")
    sampler, settings = build_sampler(cfg.sampler, model)
    tempered = not vocab and cfg.temperature != 1  # a text model's is its decoding's
    if tempered and sampler.name != "prior":
        raise UserError(f"temperature={cfg.temperature} tempers the prior's draws "
                        f"(sampler=prior); sampler={sampler.name} draws from its own fit: "
                        "leave temperature=1")
    tile = large_tile(cfg, model, sampler) if cfg.image_size else None
    out_dir = Path(cfg.out_dir) if cfg.out_dir else RunFolder.of_checkpoint(cfg.ckpt).path
    data = None
    if sampler.needs_fit or cfg.fd.samples:  # both need the data; without it, one line
        data = load_data(ckpt, cfg.dataset, next(model.parameters()).device)
    fitted_sampler(sampler, settings, model, data, cfg.ckpt, ckpt, out_dir)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        n = sample_draws(model, cfg.num_samples, cfg.label)
        z = model.prior.sample(n, cfg.temperature) if tempered else sampler.sample(n)
    stem = "samples" if sampler.name == "prior" else f"samples_{sampler.name}"
    stem += f"_t{cfg.temperature:g}" if tempered else ""
    main = out_dir / f"{stem}_seed{cfg.seed}.{'txt' if vocab else 'png'}"
    if vocab:  # a sequence model: lines of text, printed and written
        text = sample_text(model, vocab, z, float(cfg.temperature))
        print(text, end="")
        written = [write_text(main, text)]
    else:
        images, labels = save_samples(model, z, main, cfg.label)
        saved = {"images": images.cpu(), "z": z.cpu()}
        if labels is not None:  # image i is z[i % len(z)] decoded under labels[i]
            saved["labels"] = labels.cpu()
        torch.save(saved, main.with_suffix(".pt"))
        written = [main, main.with_suffix(".pt")]
    if cfg.image_size:
        written.append(large_samples(cfg, model, tile, out_dir))
    if cfg.fd.samples:
        written.append(score(cfg, model, sampler, data, ckpt, main.with_suffix(".json")))
    if cfg.pictures:
        written += pictures(cfg, model, ckpt, data, out_dir)
    print("wrote " + ", ".join(str(p) for p in written))
    return main


def large_tile(cfg: DictConfig, model: VAE, sampler) -> int:
    """The tile size for samples of cfg.image_size px, or one line why there are none:
    model=ldm with prior=normal, whose prior is the same at every position of the map
    and so extends to a larger one."""
    tile = tile_for(model.decoder, cfg.tile, "image_size", cfg.image_size)
    if sampler.name != "prior" or not isinstance(model.prior, NormalPrior):
        raise UserError("image_size draws latent maps from N(0, I) at every position: it "
                        "needs prior=normal and sampler=prior")
    return tile


def large_samples(cfg: DictConfig, model: VAE, tile: int, out_dir: Path) -> Path:
    """cfg.num_samples latent maps of N(0, I) for images of cfg.image_size px, decoded in
    tiles of ``tile`` px."""
    c, side = model.decoder.grid[0], cfg.image_size // model.decoder.factor
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    z = torch.randn(cfg.num_samples, c, side, side, device=device)
    images = model.likelihood.mean(decode_any_size(model.decoder, z, tile))
    return save_grid(images.cpu(), out_dir / f"samples_{cfg.image_size}px_seed{cfg.seed}.png")


def score(cfg: DictConfig, model: VAE, sampler, data: Splits, ckpt: dict, path: Path) -> Path:
    """The Fréchet distance of fd.samples draws to the split's images, printed and written
    beside the samples."""
    torch.manual_seed(cfg.seed)
    labels = data.labels_for("train", model.conditional)
    result = fd_score(model, sampler, data.split(cfg.split)[: max(cfg.fd.samples, 1)],
                      extractor(cfg.fd, data, dataset_root(ckpt, cfg.dataset)),
                      cfg.fd.samples, labels=labels)
    result = {"checkpoint": str(cfg.ckpt), "split": cfg.split, **result}
    key = next(k for k in result if k.startswith("fd_") and k.endswith("_features"))
    print(f"{key} {result[key]:.4f} ({result['fd_sampler']}, {cfg.fd.samples} samples vs "
          f"{result['fd_real']} {cfg.split} images; {result['fd_features']})")
    return write_text(path, json.dumps(result, indent=2) + "\n")


def pictures(cfg: DictConfig, model: VAE, ckpt: dict, data: Splits | None,
             out_dir: Path) -> list[Path]:
    """The picture set; they need the data, and without it the samples alone are still
    useful."""
    written = []
    try:
        data = data or load_data(ckpt, cfg.dataset, next(model.parameters()).device)
    except UserError as e:
        log.warning("samples only; data pictures skipped: %s", e)
    else:
        written += write_data_pictures(model, data, cfg.split, out_dir)
    curves = write_curves(RunFolder.of_checkpoint(cfg.ckpt).path)
    return written + ([curves] if curves else [])


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
