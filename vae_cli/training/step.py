"""One training step, and the named points where features plug into it.

The order, in one place: forward (under autocast) -> backward (loss-scaled under fp16) ->
unscale -> gradient clipping -> ``after_backward`` hooks (gradients final) -> optimizer step
-> auxiliary steps (a divergence's own network, e.g. the critic) -> ``after_update`` hooks
(LR schedule, EMA of weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vae_cli.objective.bounds import Objective
from vae_cli.objective.divergences import Divergence
from vae_cli.objective.parallel import Shard
from vae_cli.objective.priors import Prior
from vae_cli.runtime.device import autocast


@dataclass
class Hooks:
    """Callables run in order at each point: after_backward(), after_update(step) with the
    number of steps taken, on_log(step, metrics) where the loop reports progress."""

    after_backward: list[Callable[[], None]] = field(default_factory=list)
    after_update: list[Callable[[int], None]] = field(default_factory=list)
    on_log: list[Callable[[int, dict[str, float]], None]] = field(default_factory=list)


@dataclass
class Stepper:
    """Takes optimizer steps on batches: ``net`` is the objective as trained (possibly
    DDP-wrapped and compiled), ``objective`` the same parameters unwrapped."""

    net: nn.Module
    objective: Objective
    opt: torch.optim.Optimizer
    device: torch.device
    precision: str = "fp32"
    shard: Shard = Shard()
    aux_opt: torch.optim.Optimizer | None = None
    reduce_grads: Callable[[list[nn.Parameter]], None] = lambda params: None
    hooks: Hooks = field(default_factory=Hooks)
    scaler: torch.amp.GradScaler | None = None  # fp16: loss scaling keeps small grads
    grad_clip: float | None = None  # max total gradient norm
    fresh: bool = field(default=True, init=False)  # no gradient accumulated yet

    def __call__(self, x: torch.Tensor, step: int, y: torch.Tensor | None = None,
                 scale: float = 1.0, update: bool = True) -> dict[str, torch.Tensor]:
        """One step on batch x (with its labels y, for a conditional model), the
        ``step``-th; returns the batch's terms (on device), with ``grad_norm`` (the norm
        before clipping) when clipping is on. Gradient accumulation: the loss's gradient,
        times ``scale``, adds to those of the batches before it since the last update, and
        the optimizer steps only when ``update``."""
        with autocast(self.device, self.precision):
            terms, z = self.net(x, step, self.shard, y)
        if self.fresh:
            self.opt.zero_grad(set_to_none=True)
        loss = terms["loss"] * scale if scale != 1.0 else terms["loss"]
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.fresh = update
        if not update:
            return terms
        if self.scaler:
            self.scaler.unscale_(self.opt)  # the clip threshold is in true gradient units
        if self.grad_clip is not None:
            params = [p for g in self.opt.param_groups for p in g["params"]]
            terms = {**terms, "grad_norm": nn.utils.clip_grad_norm_(params, self.grad_clip)}
        for hook in self.hooks.after_backward:
            hook()
        if self.scaler:
            self.scaler.step(self.opt)  # skipped when the scaled grads overflowed
            self.scaler.update()
        else:
            self.opt.step()
        if self.aux_opt is not None:
            auxiliary_step(self.objective.divergence, self.objective.model.prior,
                           self.aux_opt, z, self.reduce_grads)
        for hook in self.hooks.after_update:
            hook(step + 1)
        return terms


def auxiliary_step(div: Divergence, prior: Prior, opt: torch.optim.Optimizer,
                   z: torch.Tensor, reduce_grads: Callable[[list[nn.Parameter]], None]
                   ) -> None:
    """The divergence's own network trained on this batch's (detached) latents. Its
    parameters take gradients only here, so the main backward never reaches them and data
    parallelism leaves them to ``reduce_grads``."""
    params = div.auxiliary_parameters()
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(div.auxiliary_steps):
            loss = div.auxiliary_loss(z.float(), prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            reduce_grads(params)  # replicas step alike under data parallelism
            opt.step()
            div.after_auxiliary_step(z.float(), prior)
    finally:
        for p in params:
            p.requires_grad_(False)
