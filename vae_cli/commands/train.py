"""`vae train`: validate the config, find what to resume, run the training recipe."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_cli.config.registry import check_saved, upgrade
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.runtime import checkpoint, distributed
from vae_cli.runtime.files import folder_lock
from vae_cli.runtime.run_folder import LOG, take_back
from vae_cli.training.recipe import Run, fit, setup
from vae_cli.training.resume import find_resume, resume_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    key = "hydra.sweep.dir" if hc.mode == RunMode.MULTIRUN else "hydra.run.dir"
    run_dir = Path(hc.runtime.output_dir)
    share_cores(hc)
    with no_trace_if_refused(hc):
        cfg = validate_train(cfg)
    # one run per folder: a second process into it is refused (rank 0 holds it for all)
    with folder_lock(run_dir) if distributed.rank() == 0 else nullcontext():
        with no_trace_if_refused(hc):
            run = prepare(cfg, run_dir, list(hc.overrides.task), key)
        summary = fit(run)
    log.info("best val loss %.4f after %d epochs; outputs in %s", summary["best_val"],
             summary["epoch"], run_dir)
    return summary["best_val"]


def train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float:
    """Prepare and fit, as `vae train` does (without Hydra's own folder records)."""
    summary = fit(prepare(cfg, run_dir, overrides))
    return summary["best_val"]


def prepare(cfg: DictConfig, run_dir: Path, overrides: list[str],
            folder_key: str = "hydra.run.dir") -> Run:
    """The run, set up from the config, or from the checkpoint it continues; refusals are
    raised here, before any work."""
    path = find_resume(cfg, run_dir, folder_key)
    ckpt = None
    if path is not None:
        ckpt = checkpoint.load(path)
        if "optim" not in ckpt or "state" not in ckpt:
            raise UserError(f"{path} holds no optimizer state to resume from")
        saved = upgrade(ckpt["config"])
        check_saved(saved)
        cfg = validate_train(resume_config(saved, cfg, overrides))
    return setup(cfg, run_dir, ckpt, path)


@contextmanager
def no_trace_if_refused(hc: DictConfig) -> Iterator[None]:
    """A start refused before any work takes back what Hydra wrote for it: its config
    record (.hydra, or .hydra/again-<time> beside another run's), an empty log, a folder
    made for it alone, the lines it added to a run's log. A sweep's failed job keeps its
    folder: the sweep reports it."""
    from hydra.types import RunMode

    log_file = Path(hc.runtime.output_dir) / LOG
    logged = log_file.stat().st_size if log_file.is_file() else 0
    try:
        yield
    except UserError:
        if hc.mode != RunMode.MULTIRUN and hc.output_subdir is not None:
            take_back(Path(hc.runtime.output_dir), logged)
        raise


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
