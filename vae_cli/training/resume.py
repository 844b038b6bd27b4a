"""Resume policy: which checkpoint a run continues from, and the config it continues with."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_cli.config.registry import COMPONENTS
from vae_cli.errors import UserError


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ckpt=..., or last.pt when trainer.resume=true (or
    auto and it exists)."""
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.get("ckpt"):
        return Path(cfg.ckpt)
    if cfg.trainer.resume == "auto":  # a requeued cluster job: continue if it had started
        return last if last.exists() else None
    if cfg.trainer.resume:
        if not last.exists():
            raise UserError(f"trainer.resume=true but {last} does not exist; "
                            "set hydra.run.dir=<run folder> or ckpt=<path>")
        return last
    if last.exists():
        raise UserError(f"{run_dir} already holds checkpoints; pass trainer.resume=true to "
                        "continue it or choose another hydra.run.dir")
    return None


def resume_config(saved: dict, current: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's config, with this command's trainer/optim/seed overrides on top.

    Component choices (dataset, model, ...) define the weights, so changing one is refused.
    """
    cfg = OmegaConf.create(saved)
    for ov in overrides:
        key = ov.lstrip("+~").split("=", 1)[0]
        head = key.split(".")[0].split("@")[0]
        if head in ("ckpt", "hydra") or key == "trainer.resume":
            continue
        if head in COMPONENTS:
            if key == head:  # a group choice: compare the resulting nodes
                here, there = ov.split("=", 1)[1], "another option"
                same = OmegaConf.to_container(current[head], resolve=True) == saved[head]
            else:
                here, there = OmegaConf.select(current, key), OmegaConf.select(cfg, key)
                same = here == there
            if not same:
                raise UserError(f"{key}={here} differs from the checkpoint ({there}); a resumed "
                                "run keeps its dataset/model/prior/divergence/loss")
            continue
        if head == "optim" and key == head:  # another optimizer: its whole node
            OmegaConf.update(cfg, "optim", current.optim, force_add=True, merge=False)
            continue
        OmegaConf.update(cfg, key, OmegaConf.select(current, key), force_add=True)
    return cfg
