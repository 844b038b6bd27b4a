"""Networks an objective trains for itself beside the model: a divergence's critic on z
(the adversarial W1 critic, FactorVAE's discriminator), a reconstruction loss's
discriminator on x (loss=perceptual's PatchGAN).

Protocol: a component with ``auxiliary_steps`` > 0 owns ``auxiliary_parameters``, frozen
outside its own step so the main backward never reaches them. After each main optimizer
step from step ``auxiliary_start`` on, the training step (training/step.py) takes
``auxiliary_steps`` steps of ``auxiliary_optimizer`` on ``auxiliary_loss(batch)``, the
main step's tensors detached, calling ``after_auxiliary_step(batch)`` after each (a
critic's constraint). ``logged`` names the metric column of its loss (None: not logged).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vae_cli.objective.priors import Prior


class Detached(NamedTuple):
    """What the auxiliary networks train on: the batch x, its latent sample z, the
    decoder's output for z (the likelihood's parameters) and the model's prior."""

    x: torch.Tensor
    z: torch.Tensor
    out: torch.Tensor
    prior: Prior


class Auxiliary:
    auxiliary_steps: int = 0
    auxiliary_start: int = 0  # the first main step after which it trains
    logged: str | None = None

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return []

    def auxiliary_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def auxiliary_loss(self, batch: Detached) -> torch.Tensor:
        raise NotImplementedError

    def after_auxiliary_step(self, batch: Detached) -> None:
        """After each auxiliary optimizer step (a critic's constraint)."""
