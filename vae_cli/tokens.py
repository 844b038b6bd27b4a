"""Token sequences, the contract between data and model: the special ids and two helpers.

Sequences are int64 [N, L] tensors: the tokens of a line, then <eos>, then <pad> up to L.
The decoder reads <bos> + the sequence shifted right (teacher forcing) and predicts every
position up to and including <eos>; <pad> positions are never scored. The vocabulary that
maps words to ids lives with the data (vae_cli.data.vocab).
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
    return (x != PAD).sum(-1)
