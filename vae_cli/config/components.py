"""Components from config: keys checked against the builder's signature, then built.

A component group (dataset, model, prior, divergence, loss, schedule, optim) names a
registered ``_target_`` (see registry.py); its other keys are checked against the target's
signature (unknown keys, types from annotations) so that a typo or a wrong type fails with
one line before any work.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_cli.config.registry import locate
from vae_cli.errors import UserError, one_line


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
    if origin is dict or ann is dict:
        return isinstance(value, dict | DictConfig)
    if ann is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _show(ann: Any) -> str:
    if typing.get_origin(ann) is Literal:
        return " | ".join(map(str, typing.get_args(ann)))
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def check_component(group: str, node: DictConfig) -> None:
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise UserError(f"{group} has no _target_; pick an option with {group}=<name>")
    fn = locate(group, node._target_)
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


def instantiate(group: str, node: DictConfig, *args: Any, **runtime: Any) -> Any:
    """Call a component's ``_target_`` with ``args``, its keys, and those runtime arguments
    (data shape, latent size, dataset size...) that its signature asks for."""
    fn = locate(group, node._target_)
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
              if k != "_target_"}
    params = inspect.signature(fn).parameters
    try:
        return fn(*args, **kwargs,
                  **{k: v for k, v in runtime.items() if k in params and k not in kwargs})
    except ValueError as e:  # a library's own range check (torch's schedulers, optimizers)
        raise UserError(f"{group}: {one_line(e)}") from None
