"""Start-up validation of the composed config, and building components from it.

Component groups (dataset, model, prior, divergence, loss) name a ``_target_`` inside
``vae_cli``; their other keys are checked against the target's signature (unknown keys,
types from annotations) so a typo or a wrong type fails before any work. ``trainer`` and
``optim`` have fixed schemas (dataclasses below).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from vae_cli.errors import UserError

COMPONENTS = ("dataset", "model", "prior", "divergence", "loss", "schedule")


@dataclasses.dataclass
class TrainerConfig:
    epochs: int = 40
    batch_size: int = 128
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; log-densities stay fp32)
    patience: int | None = None  # epochs without val improvement before stopping
    resume: Any = False  # true: continue hydra.run.dir's last.pt | auto: if there is one
    log_every: int = 50  # steps between progress-bar refreshes (each one syncs)
    image_every: int = 1  # epochs between reconstruction/sample grids
    num_images: int = 64
    iw_samples: int = 1  # > 1 trains on the IWAE bound (KL-family divergences only)
    tensorboard: bool = False  # scalars and image grids under <run>/tensorboard
    detect_anomaly: bool = False  # torch.autograd anomaly mode: names the op that made NaN
    compile: bool = False  # torch.compile the training step (model forward and optimizer)


@dataclasses.dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8


PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")


def locate(target: str) -> Any:
    """Import a ``_target_``, refusing anything outside this package."""
    if not isinstance(target, str) or not target.startswith("vae_cli."):
        raise UserError(f"_target_ {target!r} is outside vae_cli; refusing to build it")
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"_target_ {target!r} does not exist ({e})") from None


def check_targets(node: Any, where: str = "") -> None:
    """Every ``_target_`` anywhere in a (possibly untrusted) config must be in vae_cli."""
    if isinstance(node, dict | DictConfig):
        for k, v in node.items():
            if k == "_target_" and not (isinstance(v, str) and v.startswith("vae_cli.")):
                raise UserError(f"{where or 'config'}._target_={v!r} is outside vae_cli; "
                                "refusing to build it")
            check_targets(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list | ListConfig):
        for i, v in enumerate(node):
            check_targets(v, f"{where}[{i}]")


def _type_ok(value: Any, ann: Any) -> bool:
    if ann is inspect.Parameter.empty or ann is Any:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if origin is Literal:
        return value in typing.get_args(ann)
    if ann is type(None):
        return value is None
    if origin in (list, tuple) or ann in (list, tuple):
        args = typing.get_args(ann)
        return isinstance(value, list | tuple | ListConfig) and (
            not args or all(_type_ok(v, args[0]) for v in value))
    if ann is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _show(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def check_component(group: str, node: DictConfig) -> None:
    if "_target_" not in node:
        raise UserError(f"{group} has no _target_; pick an option with {group}=<name>")
    fn = locate(node._target_)
    try:
        params = inspect.signature(fn).parameters
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except (TypeError, ValueError, NameError):
        return
    allowed = {n for n, p in params.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD,) and n != "self"}
    for key, value in node.items():
        if key == "_target_":
            continue
        if key not in allowed:
            raise UserError(f"{group}.{key} is not an option of {group} "
                            f"(options: {', '.join(sorted(allowed)) or 'none'})")
        ann = hints.get(key, inspect.Parameter.empty)
        if not _type_ok(value, ann):
            raise UserError(f"{group}.{key}={value!r} should be {_show(ann)}")


def validate(cfg: DictConfig) -> DictConfig:
    """Check the whole training config; returns it with trainer/optim typed by schema."""
    unknown = set(cfg) - {*COMPONENTS, "trainer", "optim", "seed", "ckpt"}
    if unknown:
        raise UserError(f"unknown top-level key(s) {', '.join(sorted(unknown))}; "
                        "see vae train --cfg job for the keys")
    for group in COMPONENTS:
        if group not in cfg:
            raise UserError(f"config has no {group!r} group")
        check_component(group, cfg[group])
    check_targets(cfg)
    for name, schema in (("trainer", TrainerConfig), ("optim", OptimConfig)):
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), cfg.get(name) or {})
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            key = getattr(e, "full_key", None)
            raise UserError(f"{name}.{key}: {msg}" if key else f"{name}: {msg}") from None
        with open_dict(cfg):
            cfg[name] = typed
    t, o = cfg.trainer, cfg.optim
    positive = {"trainer.epochs": t.epochs, "trainer.batch_size": t.batch_size,
                "trainer.log_every": t.log_every, "trainer.image_every": t.image_every,
                "trainer.num_images": t.num_images, "trainer.iw_samples": t.iw_samples,
                "model.latent_dim": cfg.model.latent_dim}
    for key, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{key}={value} must be a positive integer")
    if t.resume not in (True, False, "auto"):
        raise UserError(f"trainer.resume={t.resume!r} is not true, false or auto")
    if t.patience is not None and t.patience <= 0:
        raise UserError(f"trainer.patience={t.patience} must be positive or null")
    if t.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={t.precision!r} is not one of {PRECISIONS}")
    if not (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:")):
        raise UserError(f"trainer.device={t.device!r} is not auto, cpu, cuda, cuda:N or mps")
    if o.name not in OPTIMIZERS:
        raise UserError(f"optim.name={o.name!r} is not one of {OPTIMIZERS}")
    if not o.lr > 0:
        raise UserError(f"optim.lr={o.lr} must be > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise UserError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if not isinstance(cfg.get("seed"), int):
        raise UserError(f"seed={cfg.get('seed')!r} must be an integer")
    return cfg


def instantiate(node: DictConfig, **runtime: Any) -> Any:
    """Call a component's ``_target_`` with its keys plus those runtime arguments (data
    shape, latent size, dataset size...) that its signature asks for."""
    fn = locate(node._target_)
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
              if k != "_target_"}
    params = inspect.signature(fn).parameters
    return fn(**kwargs, **{k: v for k, v in runtime.items() if k in params and k not in kwargs})


def dataset_config(saved: dict, overrides: DictConfig | None) -> DictConfig:
    """A checkpoint's dataset config with the non-null keys given on the command line
    (e.g. dataset.root on another machine) laid over it."""
    node = OmegaConf.create(saved)
    for key, value in (overrides or {}).items():
        if value is not None:
            node[key] = value
    check_targets(node, "dataset")
    check_component("dataset", node)
    return node
