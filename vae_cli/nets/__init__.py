"""Encoder/decoder builders, one module per architecture.

Every builder returns ``(encoder, decoder)``: the encoder maps x [B, C, H, W] to
[B, 2 * latent_dim] (posterior mean and log-variance), the decoder maps z [B, latent_dim]
to [B, C * out_mult, H, W] likelihood parameters (out_mult is set by the loss).
"""
