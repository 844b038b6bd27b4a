"""`vae eval ckpt=...`: rebuild the model from its checkpoint and score a split; writes
eval.json (eval_<split>.json for other splits) into the run folder and prints a table. A
conditional model is scored given each example's label: its bounds are on log p(x|y). An
image model's samples (the prior's, or ``sampler=gmm | two_stage``) are scored by the
Fréchet distance on features of vae's own network (``fd.samples=0`` skips it)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vae_cli.config.build import build_sampler, dataset_root, load_data, load_trained
from vae_cli.config.schemas import DISENTANGLEMENT_METRICS, validate_eval
from vae_cli.data.base import Splits
from vae_cli.errors import UserError
from vae_cli.evaluation.diagnostics import encode_all, mean_encoder, posterior_stats
from vae_cli.evaluation.disentanglement.suite import Intervention, score
from vae_cli.evaluation.evaluate import evaluate
from vae_cli.evaluation.features import extractor
from vae_cli.evaluation.fidelity import fidelity, fidelity_any_size
from vae_cli.evaluation.frechet import fd_score, reconstruction_fd
from vae_cli.evaluation.likelihood import iwae_bound
from vae_cli.nets.ldm import tile_for
from vae_cli.objective.model import VAE
from vae_cli.reports.tables import table
from vae_cli.runtime.device import resolve_device
from vae_cli.runtime.run_folder import RunFolder, write_eval
from vae_cli.samplers.fitted import fitted_sampler

log = logging.getLogger(__name__)
MAX_LOGITS = 2**26  # floats of decoder output held at once by `vae eval` (256 MB)
# what nelbo and nll_iwae bound for a conditional model, said in eval.json and the table
CONDITIONAL = "log p(x|y): conditional on each example's label"


def disentanglement(cfg: DictConfig, model: VAE, data: Splits, z: torch.Tensor,
                    factors: torch.Tensor) -> dict:
    """The disentanglement metrics of eval.disentanglement on the split's posterior means;
    the intervention scores where the dataset has an oracle and the encoder needs no label."""
    e = cfg.eval
    intervention, why = None, f"{data.name} has no ground-truth oracle"
    if model.conditional:
        why = "a conditional encoder needs labels, which the oracle does not draw"
    elif data.oracle is not None:
        intervention = Intervention(data.oracle, mean_encoder(model, e.batch_size))
    settings = OmegaConf.to_container(e.disentanglement, resolve=True)
    return score(z, factors, data.factor_names, settings, cfg.seed, e.mig_bins, intervention,
                 why)


def check_metrics(chosen: list[str], factors: bool, dataset: str) -> None:
    """Metrics named on the command line (not the default list) that this data cannot give
    are refused, not left out of eval.json without a word."""
    if not factors and chosen and chosen != list(DISENTANGLEMENT_METRICS):
        raise UserError(f"eval.disentanglement.metrics={chosen} need ground-truth factors, "
                        f"which {dataset} has none of (shapes and dsprites have them)")


def run(cfg: DictConfig) -> dict:
    cfg = validate_eval(cfg)
    e = cfg.eval
    objective, ckpt = load_trained(cfg.ckpt, resolve_device(cfg.device))
    model = objective.model
    tile = None
    if e.image_size:  # refused before any work when the model cannot take another size
        tile = tile_for(model.decoder, e.tile, "eval.image_size", e.image_size)
    data = load_data(ckpt, cfg.dataset, next(objective.parameters()).device)
    x, factors = data.split(e.split), data.factors.get(e.split)
    check_metrics(list(e.disentanglement.metrics), factors is not None, data.name)
    labels = data.labels_for(e.split, model.conditional)
    if e.max_examples:
        x = x[: e.max_examples]
        factors = None if factors is None else factors[: e.max_examples]
        labels = None if labels is None else labels[: e.max_examples]
    batch, iw_batch = e.batch_size, e.iw_batch
    iw_samples = e.iw_samples if model.likelihood.density else 0
    if e.iw_samples and not iw_samples:
        log.info("loss=%s is not a log-density: no likelihood bound (eval.iw_samples is "
                 "ignored)", model.likelihood.option)
    if model.out_numel:  # L x V logits per sequence: bound what is decoded at once
        batch, iw_batch = (max(1, min(b, MAX_LOGITS // model.out_numel))
                           for b in (batch, iw_batch))
    torch.manual_seed(cfg.seed)
    result = {"checkpoint": str(cfg.ckpt), "split": e.split, "examples": len(x),
              "epoch": ckpt.get("state", {}).get("epoch"),
              **({"likelihood": CONDITIONAL} if model.conditional else {}),
              **evaluate(objective, x, batch, labels=labels)}
    if iw_samples:
        result.update(iwae_bound(model, x, iw_samples, batch, iw_batch, labels))
    encoded = encode_all(model, x, batch, labels)
    if not model.autoregressive:  # images: PSNR and SSIM of the reconstructions
        result.update(fidelity(model, x, encoded[0], batch, labels, e.lpips))
    if e.image_size:  # tiled, at another size than the training one
        result.update(resized_fidelity(cfg, model, ckpt, tile))
    result.update(posterior_stats(model, x, batch, encoded=encoded))
    if factors is not None:
        result.update(disentanglement(cfg, model, data, encoded[0], factors))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else RunFolder.of_checkpoint(cfg.ckpt).path
    sampler, settings = build_sampler(cfg.sampler, model)
    fd = bool(cfg.fd.samples and data.vocab is None)  # images only
    if fd or (iw_samples and sampler.density):
        fitted_sampler(sampler, settings, model, data, cfg.ckpt, ckpt, out_dir)
    if iw_samples and sampler.density:  # the bound with the fitted density as p(z)
        torch.manual_seed(cfg.seed)
        bound = iwae_bound(model, x, iw_samples, batch, iw_batch, labels, sampler.log_prob)
        result.update({f"nll_iwae_{sampler.name}": bound["nll_iwae"],
                       f"bpd_iwae_{sampler.name}": bound.get("bpd_iwae")})
    if fd:
        result.update(frechet(cfg, model, data, x, sampler, ckpt, labels))
    path = write_eval(RunFolder(out_dir).eval_json(e.split), result)
    print(table(result))
    log.info("wrote %s", path)
    return result


def resized_fidelity(cfg: DictConfig, model, ckpt: dict, tile: int) -> dict:
    """PSNR, SSIM (and LPIPS) of the split read at eval.image_size, encoded and decoded in
    tiles of ``tile`` px (model=ldm)."""
    e = cfg.eval
    data = load_data(ckpt, cfg.dataset, next(model.parameters()).device, e.image_size)
    x = data.split(e.split)[: e.max_examples or None]
    return fidelity_any_size(model, x, e.batch_size, tile, e.lpips)


def frechet(cfg: DictConfig, model, data, x: torch.Tensor, sampler, ckpt: dict,
            labels: torch.Tensor | None) -> dict:
    """The Fréchet distance of fd.samples draws of the chosen (fitted) sampler to the
    evaluated images, and of those images' reconstructions (given their ``labels``, for a
    conditional model) to them: an autoencoder's rFID."""
    torch.manual_seed(cfg.seed)
    features = extractor(cfg.fd, data, dataset_root(ckpt, cfg.dataset))
    real, n, batch = x[: cfg.fd.samples], cfg.fd.samples, cfg.eval.batch_size
    result = fd_score(model, sampler, real, features, n, batch,
                      data.labels_for("train", model.conditional))
    return {**result, **reconstruction_fd(model, real, features, batch,
                                          None if labels is None else labels[:n])}
