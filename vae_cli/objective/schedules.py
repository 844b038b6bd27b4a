"""How the divergence term enters the loss over training steps.

Protocol: ``term(div, weight, step)`` returns the term added to the reconstruction loss;
``step`` counts optimizer steps (it advances in training only) and ``None`` means the end
of the schedule, which evaluation uses so scores do not depend on when they were taken.
A ``multiplicative`` schedule's term is ``factor(step) * weight * div``, so the same factor
can scale the log-weights inside an importance-weighted bound (see bounds.py).

``step`` may also be a float64 device tensor (the graph-safe step, training/graph.py):
the factor is then computed on the device in float64, the arithmetic Python does, and
enters the term as the same float32 number.
"""

from __future__ import annotations

import math

import torch

from vae_cli.errors import UserError

Step = int | torch.Tensor | None


def at_most_one(v: float | torch.Tensor) -> float | torch.Tensor:
    """min(1, v), for a number or a tensor."""
    return v.clamp(max=1.0) if isinstance(v, torch.Tensor) else min(1.0, v)


def as_factor(f: float | torch.Tensor, div: torch.Tensor) -> float | torch.Tensor:
    """A factor on div as the ordinary step applies it: a tensor in div's dtype (a
    Python number is cast to it by the multiplication itself)."""
    return f.to(div.dtype) if isinstance(f, torch.Tensor) else f


class Schedule:
    multiplicative = True

    @property
    def settles_at(self) -> int:
        """The step from which the term no longer changes (early stopping waits for it:
        a validation loss measured while the objective still moves says little)."""
        return 0

    def factor(self, step: Step) -> float | torch.Tensor:
        return 1.0

    def term(self, div: torch.Tensor, weight: float, step: Step) -> torch.Tensor:
        return as_factor(weight * self.factor(step), div) * div


class Constant(Schedule):
    """beta * div, always."""


class Linear(Schedule):
    """KL warm-up (Bowman et al. 2016; Sonderby et al. 2016): the weight rises linearly
    from ``start`` to beta over ``warmup_steps`` steps, then stays."""

    def __init__(self, warmup_steps: int = 10000, start: float = 0.0):
        if warmup_steps < 1 or not 0 <= start <= 1:
            raise UserError("schedule.warmup_steps must be >= 1 and schedule.start in [0, 1]")
        self.warmup_steps, self.start = warmup_steps, start

    @property
    def settles_at(self) -> int:
        return self.warmup_steps

    def factor(self, step: Step) -> float | torch.Tensor:
        if step is None:
            return 1.0
        return self.start + (1 - self.start) * at_most_one(step / self.warmup_steps)


class Logistic(Schedule):
    """Sigmoid KL annealing (Bowman et al. 2016, as in the Sentence-VAE reference code):
    the weight is beta / (1 + exp(-k (step - midpoint))), half of beta at ``midpoint``. It
    counts as settled once within 1e-3 of beta."""

    def __init__(self, k: float = 0.0025, midpoint: int = 2500):
        if k <= 0 or midpoint < 0:
            raise UserError("schedule.k must be > 0 and schedule.midpoint >= 0")
        self.k, self.midpoint = k, midpoint

    @property
    def settles_at(self) -> int:
        return self.midpoint + math.ceil(math.log(999) / self.k)  # factor >= 0.999

    def factor(self, step: Step) -> float | torch.Tensor:
        if step is None:
            return 1.0
        exp = torch.exp if isinstance(step, torch.Tensor) else math.exp
        return 1.0 / (1.0 + exp(-self.k * (step - self.midpoint)))


class Cyclical(Schedule):
    """Cyclical annealing (Fu et al. 2019): ``cycles`` cycles of ``cycle_steps`` steps, each
    rising linearly from 0 to beta over the first ``ramp`` fraction, then holding; after
    the last cycle the weight stays at beta."""

    def __init__(self, cycle_steps: int = 10000, cycles: int = 4, ramp: float = 0.5):
        if cycle_steps < 1 or cycles < 1 or not 0 < ramp <= 1:
            raise UserError("schedule.cycle_steps, cycles >= 1 and schedule.ramp in (0, 1]")
        self.cycle_steps, self.cycles, self.ramp = cycle_steps, cycles, ramp

    @property
    def settles_at(self) -> int:  # the end of the last cycle's ramp
        return self.cycle_steps * (self.cycles - 1) + math.ceil(self.ramp * self.cycle_steps)

    def factor(self, step: Step) -> float | torch.Tensor:
        if step is None:
            return 1.0
        ramp = at_most_one((step % self.cycle_steps) / self.cycle_steps / self.ramp)
        if isinstance(step, torch.Tensor):
            return torch.where(step >= self.cycle_steps * self.cycles, 1.0, ramp)
        return 1.0 if step >= self.cycle_steps * self.cycles else ramp


class Capacity(Schedule):
    """Controlled capacity (Burgess et al. 2018): gamma * beta * |div - C|, with the target
    C rising linearly from 0 to ``c_max`` nats over ``steps`` steps."""

    multiplicative = False  # |div - C| is no multiple of div

    def __init__(self, c_max: float = 25.0, steps: int = 100000, gamma: float = 1000.0):
        if c_max < 0 or steps < 1 or gamma <= 0:
            raise UserError("schedule.c_max >= 0, schedule.steps >= 1, schedule.gamma > 0")
        self.c_max, self.steps, self.gamma = c_max, steps, gamma

    @property
    def settles_at(self) -> int:
        return self.steps

    def capacity(self, step: Step) -> float | torch.Tensor:
        return self.c_max if step is None else self.c_max * at_most_one(step / self.steps)

    def term(self, div: torch.Tensor, weight: float, step: Step) -> torch.Tensor:
        return self.gamma * weight * (div - as_factor(self.capacity(step), div)).abs()
