"""Nats per example in the units each kind of data is reported in."""

from __future__ import annotations

import math

import torch

from vae_cli.tokens import is_tokens, lengths


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))


def per_unit(nats: float, x: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """A mean per-example NLL as bits per dimension for images; per token and perplexity =
    exp(total NLL / tokens) for token sequences, tokens counting <eos> (as in the
    language-modelling literature)."""
    if is_tokens(x):
        per_token = nats * len(x) / lengths(x).sum().item()
        return {f"nll_token{suffix}": per_token, f"ppl{suffix}": math.exp(per_token)}
    return {f"bpd{suffix}": bits_per_dim(nats, math.prod(x.shape[1:]))}
