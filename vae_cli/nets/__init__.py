"""Encoder/decoder builders, one module per architecture.

Every builder returns ``Networks``: the encoder maps x [B, C, H, W] to [B, 2 * latent_dim]
(posterior mean and log-variance), the decoder maps z [B, latent_dim] to
[B, C * out_mult, H, W] likelihood parameters (out_mult is set by the loss). Sequence models
(rnn) differ in their decoder: it is ``autoregressive``, ``decoder(z, x)`` returns logits
[N, V] for the N scored (non-<pad>) positions of the sequences x [B, L], in the order of
``x[tokens.scored(x)]``, and ``decoder.generate(z, temperature)`` decodes token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def image_shape(shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """(C, H, W), or a one-line refusal when the dataset gives token sequences."""
    if len(shape) != 3:
        raise UserError(f"model={model} reads images, but this dataset gives token "
                        "sequences: use model=rnn")
    return tuple(shape)
