"""Encoder/decoder builders, one module per architecture.

Every builder returns ``Networks``: the encoder maps x [B, C, H, W] to [B, 2 * latent_dim]
(posterior mean and log-variance), the decoder maps z [B, latent_dim] to
[B, C * out_mult, H, W] likelihood parameters (out_mult is set by the loss). Sequence models
(rnn) differ in their decoder: it is ``autoregressive``, ``decoder(z, x)`` returns logits
[N, V] for the N scored (non-<pad>) positions of the sequences x [B, L], in the order of
``x[tokens.scored(x)]``, and ``decoder.generate(z, temperature)`` decodes token ids.

A conditional network (Sohn et al. 2015, ``model.conditional=true``) also reads a class as
a one-hot row y [B, classes]: ``encoder(x, y)`` and ``decoder(z, y)``. An unconditional one
is built exactly as before, a plain ``nn.Sequential`` reading x or z alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vae_cli.errors import UserError


@dataclass
class Networks:
    encoder: nn.Module
    decoder: nn.Module
    # The decoder reads the sequence it scores (teacher forcing): decoder(z, x).
    autoregressive: bool = False
    # Where continuous inputs (VampPrior pseudo-inputs) live when not in the data's shape:
    # a sequence encoder also reads embedded sequences [L, E].
    soft_shape: tuple[int, ...] | None = None
    # Decoder outputs per example where large enough (L x V logits) that evaluation must
    # bound how many examples it decodes at once.
    out_numel: int | None = None
    # Width of the one-hot class both networks read besides x or z; 0: unconditional.
    classes: int = 0
    # Two stochastic layers (model=hvae): the layers reading z2, see nets/hvae.py.
    hierarchy: nn.Module | None = None
    # A top-down hierarchy of many layers (model=vdvae): the decoder, see nets/vdvae.py.
    topdown: nn.Module | None = None
    # A spatial latent (posterior=vq): the (H, W) of the encoder's map; None: a flat one.
    grid: tuple[int, int] | None = None


INITS = ("torch", "he")


def initialise(networks: Networks, init: str) -> Networks:
    """``init``: "torch" keeps PyTorch's default; "he" draws every linear layer's weights
    from N(0, 2 / fan_in), biases kept, as the VampPrior code's he_init does."""
    if init not in INITS:
        raise UserError(f"model.init={init!r} is not one of {list(INITS)}")
    if init == "he":
        for part in (networks.encoder, networks.decoder, networks.hierarchy):
            for m in part.modules() if part is not None else ():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, (2.0 / m.in_features) ** 0.5)
    return networks


class Conditioned(nn.Module):
    """``back(cat(front(x), y))``: the one-hot class y appended to the flat features that
    ``front`` makes of the input (flattened pixels, conv features, or z itself)."""

    def __init__(self, front: nn.Module, back: nn.Module):
        super().__init__()
        self.front, self.back = front, back

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.front(x)
        return self.back(torch.cat([h, y.to(h.dtype)], dim=-1))


def joined(front: list[nn.Module], back: list[nn.Module], classes: int) -> nn.Module:
    """``front`` then ``back`` as one network. Without classes it is the plain Sequential of
    both (the parameter names unconditional checkpoints were saved with); with them, the
    class enters between the two (``back``'s first layer must read ``classes`` more)."""
    if not classes:
        return nn.Sequential(*front, *back)
    return Conditioned(nn.Sequential(*front), nn.Sequential(*back))


def label_classes(conditional: bool, num_classes: int | None) -> int:
    """The one-hot width a builder adds to its inputs: the data's classes when conditional,
    0 otherwise (objective/rules.py refuses a conditional model of unlabelled data)."""
    return int(num_classes or 0) if conditional else 0


def image_shape(shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """(C, H, W), or a one-line refusal when the dataset gives token sequences."""
    if len(shape) != 3:
        raise UserError(f"model={model} reads images, but this dataset gives token "
                        "sequences: use model=rnn")
    return tuple(shape)
