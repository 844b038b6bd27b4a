"""Which builders a config may name: the component registry.

A config (composed from the command line, or read from a checkpoint someone sent) names its
components by ``_target_``. Only the targets that the package's own config tree names for a
group (configs/<group>/<option>.yaml, the samplers of `vae sample` and `vae eval` too), the
paths older checkpoints used for them, and, for ``optim``, the optimizers of
``torch.optim`` can be built; anything else is refused with one line before it is imported
or called.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_cli.errors import UserError

COMPONENTS = ("dataset", "model", "posterior", "prior", "divergence", "loss", "schedule",
              "lr_scheduler", "logger")
# Groups of the commands that read a trained model (`vae sample`, `vae eval`), not of a run.
READERS = ("sampler",)
# Groups a resumed run may change: they do not shape the weights.
SWAPPABLE = ("logger",)
# Keys that became a group option: the command line names the replacement.
RETIRED = {"trainer.tensorboard": "logger=tensorboard"}
# Modules whose components moved: their old paths stay valid in saved checkpoints.
MOVED = {f"vae_cli.{m}": f"vae_cli.objective.{m}"
         for m in ("divergences", "priors", "likelihoods", "schedules")}
# Components renamed: a saved config's old name builds the new one.
RENAMED = {"vae_cli.objective.likelihoods.Logistic":
           "vae_cli.objective.likelihoods.DiscretizedLogistic"}


def upgrade(config: dict) -> dict:
    """A checkpoint's config in today's form: checkpoints written before optim._target_
    named the optimizer by ``optim.name`` (adam | adamw); before the logger group they had
    ``trainer.tensorboard`` (true: logger=tensorboard) and no logger; before lr_scheduler,
    none (the optimizer's lr throughout); before the posterior group, the Gaussian with
    the bounds it always had; moved or renamed components, today's names."""
    optim = config.get("optim")
    if isinstance(optim, dict) and "_target_" not in optim and "name" in optim:
        names = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}
        rest = {k: v for k, v in optim.items() if k != "name"}
        config = {**config, "optim": {"_target_": names.get(optim["name"]), **rest}}
    trainer = config.get("trainer")
    board = False
    if isinstance(trainer, dict) and "tensorboard" in trainer:
        board = trainer["tensorboard"] is True
        config = {**config, "trainer": {k: v for k, v in trainer.items() if k != "tensorboard"}}
    if "logger" not in config:
        config = {**config, "logger": option("logger", "tensorboard" if board else "csv")}
    if "lr_scheduler" not in config:
        config = {**config, "lr_scheduler": option("lr_scheduler", "none")}
    if "posterior" not in config:
        config = {**config, "posterior": option("posterior", "gaussian")}
    for group in COMPONENTS:  # a moved or renamed component: today's name (registry)
        node = config.get(group)
        target = node.get("_target_") if isinstance(node, dict) else None
        today = registry()[group].get(target) if isinstance(target, str) else None
        if today and today != target:
            config = {**config, group: {**node, "_target_": today}}
    return config


def option(group: str, name: str) -> dict:
    """configs/<group>/<name>.yaml as a plain dict (the group's part of a global option)."""
    node = OmegaConf.to_container(OmegaConf.load(config_dir() / group / f"{name}.yaml"))
    return node if "_target_" in node else node[group]


def check_retired(args: list[str]) -> None:
    """A command-line key that became a group option: one line naming the option."""
    for arg in args:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key in RETIRED:
            raise UserError(f"{key} is gone; use {RETIRED[key]} (the logger group: "
                            "csv, tensorboard, mlflow, wandb)")


def config_dir() -> Path:
    """configs/ inside the package (wheel) or beside it (source checkout, editable install)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise UserError(f"cannot find the config tree next to {here}; reinstall the package")


@functools.cache
def registry() -> dict[str, dict[str, str]]:
    """group -> {target a config may name: the import path it builds}."""
    table: dict[str, dict[str, str]] = {
        "optim": {f"torch.optim.{n}": f"torch.optim.{n}" for n in _optimizers()}}
    for group in (*COMPONENTS, *READERS, "optim"):
        table.setdefault(group, {})
        for path in sorted((config_dir() / group).glob("*.yaml")):
            target = option_target(group, path)
            if isinstance(target, str):
                for alias in _aliases(target):
                    table[group][alias] = target
    return table


def _aliases(target: str) -> list[str]:
    """A target and the names older checkpoints used for it (moved modules, renames)."""
    names = [target, *(old for old, new in RENAMED.items() if new == target)]
    out = []
    for name in names:
        module, _, cls = name.rpartition(".")
        out += [name, *(f"{old}.{cls}" for old, new in MOVED.items() if new == module)]
    return out


def option_target(group: str, path: Path) -> Any:
    """The ``_target_`` a group's option file names: at its top, or under the group's key
    for an option that also chooses other groups (``# @package _global_``, model=rnn)."""
    node = OmegaConf.load(path)
    return node.get("_target_") or (node.get(group) or {}).get("_target_")


def option_names(config: dict) -> dict[str, str]:
    """group -> the option a config's component came from (model: mlp), found in the config
    tree by its _target_; the target's last part when no option names it."""
    names = {}
    for group in COMPONENTS:
        target = (config.get(group) or {}).get("_target_")
        target = registry()[group].get(target, target)
        names[group] = _options(group).get(target) or str(target).rpartition(".")[2]
    return names


@functools.cache
def _options(group: str) -> dict[str, str]:
    return {option_target(group, p): p.stem
            for p in sorted((config_dir() / group).glob("*.yaml"))}


def _optimizers() -> list[str]:
    import torch

    return [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
            and n != "Optimizer"]


def locate(group: str, target: Any) -> Any:
    """The builder a ``_target_`` names for ``group``, refusing anything unregistered."""
    path = registry().get(group, {}).get(target) if isinstance(target, str) else None
    if path is None:
        raise UserError(f"{group}._target_={target!r} is outside vae_cli's {group} options; "
                        "refusing to build it")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{group}._target_={target!r} cannot be imported ({e})") from None


def check_saved(config: Any, where: str = "") -> None:
    """A config read from a file someone sent: plain values only. A checkpoint stores its
    config resolved, so an interpolation in it (``${oc.env:...}``, ``${...}``) is refused
    rather than resolved; then every ``_target_`` must be registered."""
    _no_interpolations(config, where)
    check_targets(config, where)


def _no_interpolations(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _no_interpolations(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _no_interpolations(v, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise UserError(f"{where or 'config'}={node!r} in a saved config is an interpolation; "
                        "a checkpoint's config is stored resolved, refusing to resolve it")
    elif not isinstance(node, str | int | float | bool | type(None)):
        raise UserError(f"{where or 'config'} in a saved config is a "
                        f"{type(node).__name__}, not a plain value")


def check_targets(node: Any, where: str = "") -> None:
    """Every ``_target_`` in a (possibly hostile) config is a registered option of the
    group it stands in; a ``_target_`` anywhere else is refused."""
    if isinstance(node, dict | DictConfig):
        for k, v in node.items():
            if k == "_target_" and not (where in registry() and v in registry()[where]):
                raise UserError(f"{where or 'config'}._target_={v!r} is outside vae_cli's "
                                "registered components; refusing to build it")
            check_targets(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list | ListConfig):
        for i, v in enumerate(node):
            check_targets(v, f"{where}[{i}]")
