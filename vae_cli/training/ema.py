"""An exponential moving average of the model's weights (``trainer.ema``).

Kept as a state dict shaped like the model's own, so a checkpoint's ``ema`` entry loads into
the model directly: validation, pictures, ``vae eval`` and ``vae sample`` use it in place
of the raw weights. The decay warms up as in common practice (min(decay, (1+t)/(10+t)) at
update t), so early averages are not dominated by the random initialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay, self.updates = model, decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._pairs()

    def _pairs(self) -> None:
        # averaged: floating-point tensors (weights and running statistics); others copied
        live = self.model.state_dict()
        keys = [k for k, v in live.items() if v.is_floating_point()]
        self._avg = ([self.shadow[k] for k in keys], [live[k] for k in keys])
        self._copy = [(self.shadow[k], live[k]) for k in live if k not in keys]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current weights (after each optimizer step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow, live = self._avg
        torch._foreach_lerp_(shadow, [t.to(s.dtype) for s, t in zip(shadow, live,
                                                                       strict=True)],
                             1.0 - decay)
        for s, t in self._copy:
            s.copy_(t)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own ones after."""
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.model.load_state_dict(own)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for k, v in self.shadow.items():
            if state[k].shape != v.shape:  # copy_ would broadcast a doctored file's tensor
                raise ValueError(f"averaged weight {k!r} of shape {list(state[k].shape)}, "
                                 f"the model's is {list(v.shape)}")
            v.copy_(state[k])
        self.updates = updates
