"""Learning-rate schedules: the ``lr_scheduler`` group, one class per option.

Each wraps one of torch's own schedulers and says when it advances (``per``): after every
optimizer step, after every epoch, or on each epoch's validation loss. Its state goes into
the checkpoint, so a resume (mid-epoch included) continues the same learning rates.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim import lr_scheduler as torch_schedulers

from vae_cli.errors import UserError

Per = Literal["step", "epoch", "val"]


def plain(v: object) -> object:
    """0-dim tensors (in a list too) as Python numbers."""
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        return v.item()
    return [plain(u) for u in v] if isinstance(v, list) else v


class LRSchedule:
    """No schedule: the optimizer's lr throughout (``lr_scheduler=none``)."""

    per: Per = "epoch"
    # Laid over the whole run (trainer.epochs x steps per epoch): a resume must keep both.
    spans_run = False

    def __init__(self, optimizer: torch.optim.Optimizer, /, *, steps_per_epoch: int = 1,
                 epochs: int = 1):
        self.optimizer = optimizer
        self.scheduler: torch_schedulers.LRScheduler | torch_schedulers.ReduceLROnPlateau | None
        self.scheduler = None

    def advance(self, per: Per, val_loss: float | None = None) -> None:
        """Called after each step ("step"), each epoch ("epoch") and each validation
        ("val"); the schedule moves on the one it is defined on."""
        if self.scheduler is None or per != self.per:
            return
        if per == "val":
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        """Its torch scheduler's state, numbers as numbers: a graph-safe run keeps the lr
        as a device tensor, and its checkpoint must resume anywhere."""
        if self.scheduler is None:
            return {}
        return {k: plain(v) for k, v in self.scheduler.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        """A saved state of the same shape as this schedule's own: torch's schedulers take
        any dict, and an edited one would fail steps later, mid-run."""
        if self.scheduler is None:
            return
        problem = unlike(state, self.scheduler.state_dict(), "lr_scheduler", self.scheduler)
        if problem:
            raise ValueError(f"the saved schedule state does not fit: {problem}")
        self.scheduler.load_state_dict(state)


def unlike(saved: object, fresh: object, where: str, owner: object = None) -> str | None:
    """Where ``saved`` differs from ``fresh`` in structure or kind of value, or None. Keys
    may be missing or extra (torch versions add fields), but an extra key may not name a
    live attribute of ``owner`` that its state leaves out (its optimizer, say); numbers may
    not be NaN."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"{where} is not a mapping"
        live = [k for k in saved if k not in fresh and hasattr(owner, str(k))]
        if live:
            return f"{where} sets {live[0]}"
        return next((bad for k in fresh if k in saved
                     and (bad := unlike(saved[k], fresh[k], f"{where}.{k}"))), None)
    if isinstance(fresh, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(fresh):
            return f"{where} has another length"
        return next((bad for i, (a, b) in enumerate(zip(saved, fresh, strict=True))
                     if (bad := unlike(a, b, f"{where}[{i}]"))), None)
    if isinstance(fresh, int | float) and not isinstance(fresh, bool):
        ok = isinstance(saved, int | float) and not isinstance(saved, bool) \
            and not math.isnan(saved)
        return None if ok else f"{where}={saved!r} is not a number"
    return None if type(saved) is type(fresh) else f"{where}={saved!r} is of another kind"


class Cosine(LRSchedule):
    """Linear warm-up from ~0 over ``warmup_epochs``, then cosine decay to ``min_lr`` at the
    last step of the run; advanced per optimizer step."""

    per: Per = "step"
    spans_run = True

    def __init__(self, optimizer: torch.optim.Optimizer, /, warmup_epochs: float = 1.0,
                 min_lr: float = 0.0, *, steps_per_epoch: int = 1, epochs: int = 1):
        super().__init__(optimizer)
        total = steps_per_epoch * epochs
        warmup = round(warmup_epochs * steps_per_epoch)
        if warmup_epochs < 0 or warmup >= total:
            raise UserError(f"lr_scheduler.warmup_epochs={warmup_epochs} must be >= 0 and "
                            f"shorter than the run ({epochs} epochs)")
        lr = optimizer.param_groups[0]["lr"]
        if not 0 <= min_lr <= lr:  # above it, the "decay" would climb to min_lr
            raise UserError(f"lr_scheduler.min_lr={min_lr} must be >= 0 and at most "
                            f"optim.lr={lr:g}")
        cosine = torch_schedulers.CosineAnnealingLR(optimizer, T_max=total - warmup,
                                                    eta_min=min_lr)
        if warmup == 0:
            self.scheduler = cosine
            return
        # the first step trains at lr/warmup, the warmup-th at the full lr
        ramp = torch_schedulers.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0,
                                         total_iters=warmup - 1)
        self.scheduler = torch_schedulers.SequentialLR(optimizer, [ramp, cosine],
                                                       milestones=[warmup])


class Step(LRSchedule):
    """lr x gamma every ``step_epochs`` epochs."""

    def __init__(self, optimizer: torch.optim.Optimizer, /, step_epochs: int = 30,
                 gamma: float = 0.1, *, steps_per_epoch: int = 1, epochs: int = 1):
        super().__init__(optimizer)
        check(step_epochs=step_epochs, gamma=gamma)
        self.scheduler = torch_schedulers.StepLR(optimizer, step_size=step_epochs,
                                                 gamma=gamma)


class Exponential(LRSchedule):
    """lr x gamma after every epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, /, gamma: float = 0.95, *,
                 steps_per_epoch: int = 1, epochs: int = 1):
        super().__init__(optimizer)
        check(gamma=gamma)
        self.scheduler = torch_schedulers.ExponentialLR(optimizer, gamma=gamma)


class Plateau(LRSchedule):
    """lr x factor when the validation loss has not improved (by ``threshold``, relative)
    for ``patience`` epochs, down to ``min_lr``."""

    per: Per = "val"

    def __init__(self, optimizer: torch.optim.Optimizer, /, factor: float = 0.5,
                 patience: int = 5, threshold: float = 1e-4, min_lr: float = 0.0, *,
                 steps_per_epoch: int = 1, epochs: int = 1):
        super().__init__(optimizer)
        check(factor=factor)
        if patience < 0 or threshold < 0 or min_lr < 0:
            raise UserError("lr_scheduler.patience, threshold and min_lr must be >= 0")
        self.scheduler = torch_schedulers.ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=patience, threshold=threshold,
            min_lr=min_lr)


class Staged(LRSchedule):
    """The IWAE paper's schedule (Burda et al. 2016, sec. 5): stage i = 0..stages-1 lasts
    base^i epochs at lr x decay^i (3^i epochs at lr x 10^(-i/7), 3280 epochs in all); the
    last stage's lr is kept if the run goes on."""

    def __init__(self, optimizer: torch.optim.Optimizer, /, stages: int = 8, base: int = 3,
                 decay: float = 10 ** (-1 / 7), *, steps_per_epoch: int = 1, epochs: int = 1):
        super().__init__(optimizer)
        check(stages=stages, base=base, decay=decay)
        ends = [sum(base**j for j in range(i + 1)) for i in range(stages - 1)]
        self.scheduler = torch_schedulers.MultiStepLR(optimizer, milestones=ends, gamma=decay)

    @staticmethod
    def total_epochs(stages: int = 8, base: int = 3) -> int:
        return sum(base**i for i in range(stages))


def check(**values: float) -> None:
    """Counts and factors of a schedule are positive (a factor of 0 would zero the lr)."""
    for key, value in values.items():
        if not value > 0 or not math.isfinite(value):
            raise UserError(f"lr_scheduler.{key}={value} must be > 0")
