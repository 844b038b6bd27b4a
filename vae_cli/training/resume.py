"""Resume policy: which checkpoint a run continues from, and the config it continues with."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_cli.config.registry import COMPONENTS, SWAPPABLE
from vae_cli.errors import UserError
from vae_cli.runtime.run_folder import FAILED, HYDRA, LOG, RunFolder

# A component's settings that say where its files are, not what they are: a run moved to
# another machine continues with its data read from there (setup checks that the data has
# the run's shape and size).
LOCATION = ("root", "download")

# What a run folder may hold before a run starts in it: Hydra's record of this start, its
# log, a failed sweep job's marker. Anything else belongs to another run.
OWN = {HYDRA, LOG, FAILED}


def another_run(run_dir: Path) -> list[str]:
    """What in run_dir belongs to a run: all but OWN, and a checkpoints/ folder holding no
    checkpoint yet (a start killed while writing its first one)."""
    if not run_dir.is_dir():
        return []
    ckpts = RunFolder(run_dir).checkpoints
    empty = ckpts.is_dir() and not any(ckpts.glob("*.pt"))
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in OWN and not (p == ckpts and empty))


def find_resume(cfg: DictConfig, run_dir: Path, folder_key: str = "hydra.run.dir"
                ) -> Path | None:
    """The checkpoint to continue from: ckpt=..., or last.pt when trainer.resume=true (or
    auto and it exists). A run folder is written only when it is empty, absent, or the
    resumed run's own: never mixed with another run's files. ``folder_key`` is the setting
    that chose run_dir (a sweep's job folder comes from hydra.sweep.dir)."""
    last = RunFolder(run_dir).last
    others = another_run(run_dir)
    if cfg.get("ckpt"):
        path = Path(cfg.ckpt)
        if others and RunFolder.of_checkpoint(path).path != run_dir.resolve():
            raise UserError(f"{run_dir} holds another run ({', '.join(others[:3])}); "
                            f"ckpt={path} continues in its own run folder or an empty one")
        return path
    if cfg.trainer.resume == "auto" and last.exists():  # a requeued cluster job
        return last
    if cfg.trainer.resume is True:
        if not last.exists():
            raise UserError(f"trainer.resume=true but {last} does not exist; "
                            "set hydra.run.dir=<run folder> or ckpt=<path>")
        return last
    if others:
        raise UserError(f"{run_dir} already holds a run ({', '.join(others[:3])}); pass "
                        f"trainer.resume=true to continue it or choose another {folder_key}")
    return None


def resume_config(saved: dict, current: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's config, with this command's trainer/optim overrides on top (a
    changed seed is refused: the saved random streams continue).

    Component choices (dataset, model, ...) define the weights, so changing one is refused;
    the logger may change (a resumed run can start tracking), and so may where the data is
    (``LOCATION``).
    """
    cfg = OmegaConf.create(saved)
    for ov in overrides:
        key = ov.lstrip("+~").split("=", 1)[0]
        head = key.split(".")[0].split("@")[0]
        if head in ("ckpt", "hydra") or key == "trainer.resume":
            continue
        if head == "seed" and current.get("seed") != cfg.get("seed"):
            raise UserError(f"seed={current.get('seed')} differs from the run's "
                            f"({cfg.get('seed')}); a resumed run continues its saved random "
                            "streams, so a seed is chosen only when a run starts")
        if head == "experiment":  # a preset: what it chose must be what the run chose
            check_components(current, saved, ov)
            continue
        if head in COMPONENTS and head not in SWAPPABLE and key.split(".")[-1] not in LOCATION:
            if key == head:  # a group choice: compare the resulting nodes
                here, there = ov.split("=", 1)[1], "another option"
                same = located(OmegaConf.to_container(current[head], resolve=True)) == \
                    located(saved[head])
            else:
                here, there = OmegaConf.select(current, key), OmegaConf.select(cfg, key)
                same = here == there
            if not same:
                raise UserError(f"{key}={here} differs from the checkpoint ({there}); a resumed "
                                f"run keeps its {head} (as its other components)")
            continue
        if head in ("optim", *SWAPPABLE) and key == head:  # another option: its whole node
            OmegaConf.update(cfg, head, current[head], force_add=True, merge=False)
            continue
        OmegaConf.update(cfg, key, OmegaConf.select(current, key), force_add=True)
    return cfg


def check_components(current: DictConfig, saved: dict, override: str) -> None:
    """``experiment=<preset>`` on a resume: refused unless the preset composes the same
    components the run was trained with (its trainer settings are the run's already)."""
    for group in COMPONENTS:
        if group in SWAPPABLE or group not in current or group not in saved:
            continue
        here = OmegaConf.to_container(current[group], resolve=True)
        if located(here) != located(saved[group]):
            raise UserError(f"{override} gives another {group} than the checkpoint's; a "
                            f"resumed run keeps its {group} (as its other components)")


def located(node: object) -> object:
    """A component's settings without those that say where its files are."""
    if isinstance(node, dict):
        return {k: v for k, v in node.items() if k not in LOCATION}
    return node


def check_data(ckpt: dict, dataset: DictConfig, shape: tuple[int, ...], size: int) -> None:
    """Data a resumed run reads from another folder than its own has the run's shape and
    size. (In its own folder, an edited file is the user's to change: a text run continues
    with its own vocabulary.)"""
    saved = (ckpt.get("config") or {}).get("dataset") or {}
    if not isinstance(saved.get("root"), str) or not isinstance(dataset.get("root"), str) \
            or absolute(saved["root"]) == absolute(dataset.root):
        return
    run_shape, run_size = list(ckpt.get("shape", shape)), ckpt.get("dataset_size", size)
    if (list(shape), size) != (run_shape, run_size):
        raise UserError(f"the data read now has {size} training examples of shape "
                        f"{list(shape)}, the run's had {run_size} of shape {run_shape}; a "
                        "resumed run keeps its data")


def absolute(folder: str) -> str:
    return str(Path(folder).expanduser().resolve())
