"""One training step, and the named points where features plug into it.

The order, in one place: forward (under autocast) -> backward (loss-scaled under fp16) ->
unscale -> gradient clipping -> ``after_backward`` hooks (gradients final) -> optimizer step
-> auxiliary steps (networks the objective trains for itself: a divergence's critic, a
loss's discriminator) -> ``after_update`` hooks (LR schedule, EMA of weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vae_cli.errors import UserError
from vae_cli.objective.auxiliary import Auxiliary, Detached
from vae_cli.objective.bounds import Objective
from vae_cli.objective.parallel import Shard
from vae_cli.runtime.device import autocast


@dataclass
class Hooks:
    """Callables run in order at each point: after_backward(), after_update(step) with the
    number of steps taken, on_log(step, metrics) where the loop reports progress."""

    after_backward: list[Callable[[], None]] = field(default_factory=list)
    after_update: list[Callable[[int], None]] = field(default_factory=list)
    on_log: list[Callable[[int, dict[str, float]], None]] = field(default_factory=list)


@dataclass
class SkipRule:
    """VDVAE's stabiliser (Child 2021): an update whose gradient norm exceeds
    ``threshold`` (or is not finite) is skipped, the batch's gradients dropped; ``limit``
    skips in a row stop the run in one line rather than skipping forever (the failure
    VDVAE's users report). Judging reads the norm on the host: one sync per update."""

    threshold: float
    limit: int
    in_a_row: int = 0

    def judge(self, norm: torch.Tensor) -> torch.Tensor:
        """1.0 when this update is skipped, else 0.0 (on the norm's device)."""
        value = float(norm)
        skipped = not value <= self.threshold
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise UserError(f"{self.in_a_row} updates in a row were skipped: the gradient "
                            f"norm ({value:.4g}) stays above trainer.skip_threshold="
                            f"{self.threshold:g}; raise it or lower optim.lr (the last good "
                            "checkpoint is kept)")
        return norm.new_tensor(float(skipped))


@dataclass
class Stepper:
    """Takes optimizer steps on batches: ``net`` is the objective as trained (possibly
    DDP-wrapped and compiled), ``objective`` the same parameters unwrapped; ``aux_opts``
    the optimizers of ``objective.auxiliaries()``, in that order."""

    net: nn.Module
    objective: Objective
    opt: torch.optim.Optimizer
    device: torch.device
    precision: str = "fp32"
    shard: Shard = Shard()
    aux_opts: list[torch.optim.Optimizer] = field(default_factory=list)
    reduce_grads: Callable[[list[nn.Parameter]], None] = lambda params: None
    hooks: Hooks = field(default_factory=Hooks)
    scaler: torch.amp.GradScaler | None = None  # fp16: loss scaling keeps small grads
    grad_clip: float | None = None  # max total gradient norm
    skip: SkipRule | None = None  # skip updates whose gradient norm is too large
    fresh: bool = field(default=True, init=False)  # no gradient accumulated yet

    def __call__(self, x: torch.Tensor, step: int, y: torch.Tensor | None = None,
                 scale: float = 1.0, update: bool = True) -> dict[str, torch.Tensor]:
        """One step on batch x (with its labels y, for a conditional model), the
        ``step``-th; returns the batch's terms (on device), then those of the update:
        ``grad_norm`` (the norm before clipping) when clipping is on, and the losses of
        the auxiliary networks that log one. Gradient accumulation: the loss's gradient,
        times ``scale``, adds to those of the batches before it since the last update,
        and the optimizer steps only when ``update``. A batch without an update reports
        its update terms as 0 and the update's as ``1 / scale`` times their value, so an
        epoch's mean per batch is their mean per update, weighted by group size."""
        with autocast(self.device, self.precision):
            terms, batch = self.net(x, step, self.shard, y)
        if self.fresh:
            self.opt.zero_grad(set_to_none=True)
        loss = terms["loss"] * scale if scale != 1.0 else terms["loss"]
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.fresh = update
        if not update:
            zero = terms["loss"].detach().new_zeros(())
            return {**terms, **{k: zero for k in self.update_terms()}}
        made = self.update(step, batch)
        return {**terms, **{k: v / scale for k, v in made.items()}}

    def update_terms(self) -> list[str]:
        """The names of the terms an update adds, in order."""
        aux = [a.logged for a in self.objective.auxiliaries() if a.logged]
        norm = ["grad_norm"] if self.grad_clip is not None or self.skip else []
        return norm + (["skipped"] if self.skip else []) + aux

    def update(self, step: int, batch: Detached) -> dict[str, torch.Tensor]:
        """The optimizer step on the summed gradients, then the auxiliary steps and the
        after_update hooks."""
        made: dict[str, torch.Tensor] = {}
        if self.scaler:
            self.scaler.unscale_(self.opt)  # the clip threshold is in true gradient units
        made.update(self.clipped())
        for hook in self.hooks.after_backward:
            hook()
        skipped = False
        if self.skip:
            made["skipped"] = self.skip.judge(made["grad_norm"])
            skipped = self.skip.in_a_row > 0
        if self.scaler:
            if not skipped:
                self.scaler.step(self.opt)  # skipped when the scaled grads overflowed
            self.scaler.update()
        elif not skipped:
            self.opt.step()
        for aux, opt in zip(self.objective.auxiliaries(), self.aux_opts, strict=True):
            loss = batch.x.new_zeros(())
            if step >= aux.auxiliary_start:
                loss = auxiliary_step(aux, opt, batch, self.reduce_grads)
            if aux.logged:
                made[aux.logged] = loss
        for hook in self.hooks.after_update:
            hook(step + 1)
        return made

    def clipped(self) -> dict[str, torch.Tensor]:
        """Clips the gradients to ``grad_clip``; {"grad_norm": the norm before clipping}
        when clipping or skipping is on, else {}."""
        if self.grad_clip is None and not self.skip:
            return {}
        params = [p for g in self.opt.param_groups for p in g["params"]]
        return {"grad_norm": nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)}


def auxiliary_step(aux: Auxiliary, opt: torch.optim.Optimizer, batch: Detached,
                   reduce_grads: Callable[[list[nn.Parameter]], None]) -> torch.Tensor:
    """An auxiliary network trained on this step's detached tensors; returns its last
    loss. Its parameters take gradients only here, so the main backward never reaches them
    and data parallelism leaves them to ``reduce_grads``."""
    params = aux.auxiliary_parameters()
    batch = batch._replace(z=batch.z.float())
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(aux.auxiliary_steps):
            loss = aux.auxiliary_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            reduce_grads(params)  # replicas step alike under data parallelism
            opt.step()
            aux.after_auxiliary_step(batch)
    finally:
        for p in params:
            p.requires_grad_(False)
    return loss.detach()
