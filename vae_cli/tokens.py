"""Token sequences, the contract between data and model: the special ids and helpers.

Sequences are int64 [N, L] tensors: the tokens of a line, then <eos>, then <pad> up to L.
The decoder reads <bos> + the sequence shifted right (teacher forcing) and predicts every
position up to and including <eos>; <pad> positions are never scored, so the decoder
returns logits for the scored positions only, [N_scored, V] in the order of
``x[scored(x)]``. A batch is trimmed to its longest sequence before the model reads it. The
vocabulary that maps words to ids lives with the data (vae_cli.data.vocab).
"""

from __future__ import annotations

import torch

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def is_tokens(x: torch.Tensor) -> bool:
    """Token ids are integer tensors other than uint8 (which holds images)."""
    return not x.dtype.is_floating_point and x.dtype != torch.uint8


def lengths(x: torch.Tensor) -> torch.Tensor:
    """Scored positions per sequence (tokens + <eos>): [N]."""
    return scored(x).sum(-1)


def scored(x: torch.Tensor) -> torch.Tensor:
    """The positions a sequence model predicts, bool like x: every one but <pad>."""
    return x != PAD


def trim(x: torch.Tensor) -> torch.Tensor:
    """x [B, L] without its trailing columns that are <pad> in every row. Nothing reads
    them (the encoder packs, the decoder is causal, <pad> is never scored), so every score
    stays the same and only the work shrinks: a batch of short lines costs what short lines
    cost. One host sync for the kept length."""
    used = scored(x).any(0)
    return x[:, : len(used) - int(used.flip(0).to(torch.uint8).argmax())]
