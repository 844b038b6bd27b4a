"""`vae train`: validate the config, find what to resume, run the training recipe."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_cli.config.registry import check_saved, upgrade
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.runtime import checkpoint, distributed
from vae_cli.runtime.files import folder_lock
from vae_cli.training.recipe import fit, setup
from vae_cli.training.resume import find_resume, resume_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    share_cores(hc)
    cfg = validate_train(cfg)
    # one run per folder: a second process into it is refused (rank 0 holds it for all)
    with folder_lock(run_dir) if distributed.rank() == 0 else nullcontext():
        return train(cfg, run_dir, list(hc.overrides.task))


def train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    path = find_resume(cfg, run_dir)
    ckpt = None
    if path is not None:
        ckpt = checkpoint.load(path)
        if "optim" not in ckpt or "state" not in ckpt:
            raise UserError(f"{path} holds no optimizer state to resume from")
        saved = upgrade(ckpt["config"])
        check_saved(saved)
        cfg = validate_train(resume_config(saved, cfg, overrides))
    summary = fit(setup(cfg, run_dir, ckpt, path))
    log.info("best val loss %.4f after %d epochs; outputs in %s", summary["best_val"],
             summary["epoch"], run_dir)
    return summary["best_val"]


def share_cores(hc) -> None:
    """Jobs that a launcher runs side by side on this machine (joblib's n_jobs) split its
    cores, rather than each starting a thread per core and thrashing."""
    jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None)
    if not isinstance(jobs, int) or jobs == 1:
        return
    import torch

    cores = os.cpu_count() or 1
    jobs = jobs if jobs > 0 else max(1, cores + 1 + jobs)  # joblib: -1 all cores, -2 all but one
    batch = OmegaConf.select(hc, "sweeper.n_jobs", default=None)  # Optuna: trials at once
    if isinstance(batch, int) and batch > 0:
        jobs = min(jobs, batch)
    torch.set_num_threads(max(1, cores // min(jobs, cores)))
