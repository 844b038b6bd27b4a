"""Encoder/decoder builders, one module per architecture.

Every builder returns ``(encoder, decoder)``: the encoder maps x [B, C, H, W] to
[B, 2 * latent_dim] (posterior mean and log-variance), the decoder maps z [B, latent_dim]
to [B, C * out_mult, H, W] likelihood parameters (out_mult is set by the loss).
Sequence models (rnn) differ only in their decoder: ``autoregressive = True`` and
``decoder(z, x)`` returns logits [B, L, V] for every position of the sequence x.
"""

from vae_cli.errors import UserError


def image_shape(shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """(C, H, W), or a one-line refusal when the dataset gives token sequences."""
    if len(shape) != 3:
        raise UserError(f"model={model} reads images, but this dataset gives token "
                        "sequences: use model=rnn")
    return tuple(shape)
