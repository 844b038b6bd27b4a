"""Fully connected encoder/decoder, with the gated units of the VampPrior paper."""

from __future__ import annotations

import torch
from torch import nn

from vae_cli.errors import UserError
from vae_cli.nets import Networks, image_shape, initialise, joined, label_classes

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU,
               "softplus": nn.Softplus, "gelu": nn.GELU}


class Gated(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): GatedDense of Tomczak & Welling (2018)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.both = nn.Linear(n_in, 2 * n_out)  # one matmul for value and gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.both(x).chunk(2, dim=-1)
        return h * torch.sigmoid(g)


def _stack(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        if activation == "gated":
            layers.append(Gated(n_in, n_out))
        else:
            layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class Unflatten(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)


def build(latent_dim: int = 10, hidden: list[int] = (512, 256), activation: str = "relu",
          conditional: bool = False, init: str = "torch", *, shape: tuple[int, int, int],
          out_mult: int = 1, num_classes: int | None = None,
          posterior_outputs: int | None = None) -> Networks:
    """MLP encoder [D -> hidden... -> 2z] and mirrored decoder [z -> ...hidden -> D*out_mult].
    Conditional: the one-hot class is appended to the flattened image and to z."""
    if activation not in ACTIVATIONS and activation != "gated":
        raise UserError(f"model.activation={activation!r} is not one of "
                        f"{sorted([*ACTIVATIONS, 'gated'])}")
    hidden = list(hidden)
    if not hidden or min(hidden) <= 0:
        raise UserError(f"model.hidden={hidden} must be a non-empty list of positive sizes")
    c, h, w = image_shape(shape, "mlp")
    d, k = c * h * w, label_classes(conditional, num_classes)
    head = nn.Linear(hidden[-1], posterior_outputs or 2 * latent_dim)
    encoder = joined([nn.Flatten()], [_stack([d + k, *hidden], activation), head], k)
    decoder = joined([], [_stack([latent_dim + k, *hidden[::-1]], activation),
                          nn.Linear(hidden[0], d * out_mult), Unflatten((c * out_mult, h, w))],
                     k)
    return initialise(Networks(encoder, decoder, classes=k), init)
