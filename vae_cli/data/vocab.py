"""Token vocabulary for sequence data: building from text, encoding, decoding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from vae_cli.errors import UserError
from vae_cli.tokens import EOS, PAD, SPECIALS, UNK

TOKENIZERS = ("word", "char")


def split_line(line: str, tokens: str) -> list[str]:
    if tokens == "word":
        return line.split()
    return list(line.strip())


class Vocab:
    def __init__(self, itos: list[str], tokens: str):
        if itos[: len(SPECIALS)] != SPECIALS:
            raise UserError("vocabulary does not start with the special tokens "
                            f"{SPECIALS}; the checkpoint or file is not a vae vocabulary")
        if tokens not in TOKENIZERS:
            raise UserError(f"dataset.tokens={tokens!r} is not one of {TOKENIZERS}")
        self.itos, self.tokens = list(itos), tokens
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, lines: Iterable[str], tokens: str, min_freq: int = 1,
              max_size: int | None = None, max_length: int | None = None) -> Vocab:
        """Tokens seen at least min_freq times, most frequent first (ties alphabetical, so the
        same text always gives the same ids); the rest map to <unk>. Only the first
        ``max_length`` tokens of a line count: the rest are cut before the model sees them."""
        counts = Counter(t for line in lines for t in split_line(line, tokens)[:max_length])
        kept = sorted((t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        return cls(SPECIALS + kept[:max_size], tokens)

    def state(self) -> dict:
        """What a checkpoint stores: plain lists and strings (loads with weights_only)."""
        return {"itos": list(self.itos), "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict | None) -> Vocab | None:
        return None if state is None else cls(state["itos"], state["tokens"])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, lines: list[str], max_length: int) -> tuple[torch.Tensor, int]:
        """[N, max_length + 1] ids (tokens, <eos>, <pad>...); also how many lines were cut
        to max_length tokens."""
        out = torch.full((len(lines), max_length + 1), PAD, dtype=torch.long)
        cut = 0
        for i, line in enumerate(lines):
            ids = [self.stoi.get(t, UNK) for t in split_line(line, self.tokens)]
            cut += len(ids) > max_length
            ids = ids[:max_length] + [EOS]
            out[i, : len(ids)] = torch.tensor(ids)
        return out, cut

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Tokens up to the first <eos> (or <pad>), joined as they were split."""
        words = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i in (EOS, PAD):
                break
            words.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK])
        return (" " if self.tokens == "word" else "").join(words)
