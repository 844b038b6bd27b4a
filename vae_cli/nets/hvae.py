"""The two-level hierarchical VAE of Tomczak & Welling (2018, their HVAE): z2 -> z1 -> x.

Generative model p(x|z1, z2) p(z1|z2) p(z2), inference q(z1|x, z2) q(z2|x); p(z2) is the
configured prior (normal, vamp, ...). The latent the rest of vae sees is z = [z1, z2]. Every
block is a gated dense layer as in the paper (or another activation), 300 units by default:

- q(z2|x): x -> 2 layers -> (mu, logvar) of z2; q(z1|x, z2): x -> 1 layer and z2 -> 1 layer,
  joined -> 1 layer -> (mu, logvar) of z1 (the encoder computes the x-branch once);
- p(z1|z2): z2 -> 2 layers -> (mu, logvar) of z1;
- p(x|z1, z2): z1 -> 1 layer and z2 -> 1 layer, joined -> 1 layer -> the likelihood's
  parameters.
The layers that read sampled z2 live in ``Hierarchy``; the model's posterior and prior call
them (vae_cli.objective.hierarchy).
"""

from __future__ import annotations

import torch
from torch import nn

from vae_cli.errors import UserError
from vae_cli.nets import Networks, image_shape, initialise
from vae_cli.nets.mlp import ACTIVATIONS, Unflatten, _stack


class Encoder(nn.Module):
    """x -> [(mu, logvar) of q(z2|x) (2 * top_dim), the x-branch of q(z1|x, z2) (hidden)]."""

    def __init__(self, d: int, hidden: int, top_dim: int, activation: str):
        super().__init__()
        self.z2 = nn.Sequential(nn.Flatten(), _stack([d, hidden, hidden], activation),
                                nn.Linear(hidden, 2 * top_dim))
        self.x_branch = nn.Sequential(nn.Flatten(), _stack([d, hidden], activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.z2(x), self.x_branch(x)], dim=-1)


class Hierarchy(nn.Module):
    """The layers that read z2: q(z1|x, z2) from the encoder's x-branch, and p(z1|z2)."""

    def __init__(self, latent_dim: int, top_dim: int, hidden: int, activation: str):
        super().__init__()
        self.latent_dim, self.top_dim, self.hidden = latent_dim, top_dim, hidden
        self.q_z2_branch = _stack([top_dim, hidden], activation)
        self.q_joint = nn.Sequential(_stack([2 * hidden, hidden], activation),
                                     nn.Linear(hidden, 2 * latent_dim))
        self.p_z1 = nn.Sequential(_stack([top_dim, hidden, hidden], activation),
                                  nn.Linear(hidden, 2 * latent_dim))

    def posterior_z1(self, hx: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """(mu, logvar) of q(z1|x, z2), [..., 2 * latent_dim]; hx [B, hidden] broadcasts
        over leading sample dimensions of z2 [..., B, top_dim]."""
        hz = self.q_z2_branch(z2)
        return self.q_joint(torch.cat([hx.expand(*hz.shape[:-1], hx.shape[-1]), hz], -1))

    def prior_z1(self, z2: torch.Tensor) -> torch.Tensor:
        return self.p_z1(z2)


class Decoder(nn.Module):
    def __init__(self, d: int, latent_dim: int, top_dim: int, hidden: int, activation: str,
                 out_shape: tuple[int, ...]):
        super().__init__()
        self.latent_dim = latent_dim
        self.z1 = _stack([latent_dim, hidden], activation)
        self.z2 = _stack([top_dim, hidden], activation)
        self.joint = nn.Sequential(_stack([2 * hidden, hidden], activation),
                                   nn.Linear(hidden, d), Unflatten(out_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z[..., : self.latent_dim], z[..., self.latent_dim:]
        return self.joint(torch.cat([self.z1(z1), self.z2(z2)], dim=-1))


def build(latent_dim: int = 40, top_dim: int = 40, hidden: int = 300,
          activation: str = "gated", conditional: bool = False, init: str = "torch", *,
          shape: tuple[int, int, int], out_mult: int = 1) -> Networks:
    if conditional:
        raise UserError("model=hvae has no conditional form yet; use model=mlp, conv or "
                        "resnet with model.conditional=true")
    if activation not in ACTIVATIONS and activation != "gated":
        raise UserError(f"model.activation={activation!r} is not one of "
                        f"{sorted([*ACTIVATIONS, 'gated'])}")
    for key, value in (("latent_dim", latent_dim), ("top_dim", top_dim), ("hidden", hidden)):
        if value <= 0:
            raise UserError(f"model.{key}={value} must be a positive integer")
    c, h, w = image_shape(shape, "hvae")
    d = c * h * w
    return initialise(Networks(Encoder(d, hidden, top_dim, activation),
                               Decoder(d * out_mult, latent_dim, top_dim, hidden, activation,
                                       (c * out_mult, h, w)),
                               hierarchy=Hierarchy(latent_dim, top_dim, hidden, activation)),
                      init)
