"""Recurrent encoder/decoder for token sequences: the sentence VAE (Bowman et al. 2016).

The encoder reads the embedded tokens (packed, so padding never enters the state) and maps
its last hidden state to the posterior parameters. The decoder is a language model
conditioned on z, through its initial state and/or concatenated to every input, and reads
<bos> + the sequence shifted right. Word dropout replaces decoder inputs by <unk> during
training so the decoder must lean on z, which with KL warm-up is what keeps the KL from
collapsing to zero. Encoder and decoder share one embedding table.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from vae_cli.errors import UserError
from vae_cli.nets import Networks
from vae_cli.tokens import BOS, EOS, PAD, UNK, lengths, scored

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
CONDITIONS = ("init", "input", "both")


class Encoder(nn.Module):
    def __init__(self, embed: nn.Embedding, hidden: int, latent_dim: int, cell: str,
                 layers: int, bidirectional: bool, embed_dropout: float, outputs: int):
        super().__init__()
        self.embed, self.dropout = embed, nn.Dropout(embed_dropout)
        self.rnn = CELLS[cell](embed.embedding_dim, hidden, layers, batch_first=True,
                               bidirectional=bidirectional)
        self.dirs = 2 if bidirectional else 1
        self.head = nn.Linear(self.dirs * hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L], or already embedded full-length sequences [B, L, E]."""
        if x.dtype.is_floating_point:
            _, h = self.rnn(x)
        else:
            # lengths go to the CPU for packing: one small copy per batch
            packed = pack_padded_sequence(self.dropout(self.embed(x)), lengths(x).cpu(),
                                          batch_first=True, enforce_sorted=False)
            _, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h  # LSTM: (h, c)
        last = h.view(-1, self.dirs, *h.shape[1:])[-1]  # top layer: [dirs, B, H]
        return self.head(last.transpose(0, 1).reshape(len(x), -1))


class Decoder(nn.Module):
    def __init__(self, embed: nn.Embedding, hidden: int, latent_dim: int, cell: str,
                 layers: int, length: int, condition: str, word_dropout: float,
                 embed_dropout: float):
        super().__init__()
        self.embed, self.dropout = embed, nn.Dropout(embed_dropout)
        self.by_input = condition in ("input", "both")
        self.rnn = CELLS[cell](embed.embedding_dim + latent_dim * self.by_input, hidden,
                               layers, batch_first=True)
        self.init = nn.Linear(latent_dim, layers * hidden) if condition != "input" else None
        self.out = nn.Linear(hidden, embed.num_embeddings)
        self.length, self.layers, self.hidden = length, layers, hidden
        self.word_dropout, self.lstm = word_dropout, cell == "lstm"

    def initial_state(self, z: torch.Tensor):
        if self.init is None:
            h = z.new_zeros(self.layers, len(z), self.hidden)
        else:
            h = torch.tanh(self.init(z)).view(len(z), self.layers, -1).transpose(0, 1)
            h = h.contiguous()
        return (h, torch.zeros_like(h)) if self.lstm else h

    def inputs(self, tokens: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        e = self.dropout(self.embed(tokens))
        if self.by_input:
            e = torch.cat([e, z.unsqueeze(1).expand(-1, e.shape[1], -1).to(e.dtype)], -1)
        return e

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] of x's scored positions (x[scored(x)], row-major), each given z
        and the tokens before it. The vocabulary projection, most of the work on a large
        vocabulary, runs on those positions only, never on <pad>."""
        prev = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], dim=1)
        if self.training and self.word_dropout > 0:
            drop = torch.rand(prev.shape, device=prev.device) < self.word_dropout
            prev = torch.where(drop & (prev != PAD) & (prev != BOS), UNK, prev)
        out, _ = self.rnn(self.inputs(prev, z), self.initial_state(z))
        return self.out(out[scored(x)])

    @torch.no_grad()
    def generate(self, z: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
        """Token ids [N, L] decoded from z: greedy at temperature 0, else sampled from
        softmax(logits / temperature); <pad> after <eos>."""
        n = len(z)
        tok = torch.full((n,), BOS, dtype=torch.long, device=z.device)
        out = torch.full((n, self.length), PAD, dtype=torch.long, device=z.device)
        done = torch.zeros(n, dtype=torch.bool, device=z.device)
        state = self.initial_state(z)
        for t in range(self.length):
            h, state = self.rnn(self.inputs(tok[:, None], z), state)
            logits = self.out(h[:, 0]).float()
            logits[:, [PAD, BOS]] = -torch.inf  # never targets, so never emitted
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
            else:
                tok = logits.argmax(-1)
            tok = torch.where(done, PAD, tok)
            out[:, t] = tok
            done |= tok == EOS
            if bool(done.all()):
                break
        return out


def build(latent_dim: int = 16, embed_dim: int = 300, hidden: int = 256, cell: str = "gru",
          layers: int = 1, bidirectional: bool = False, condition: str = "init",
          word_dropout: float = 0.0, embed_dropout: float = 0.0, conditional: bool = False,
          *, shape: tuple[int, ...], vocab_size: int | None = None,
          posterior_outputs: int | None = None) -> Networks:
    if conditional:  # text datasets carry no class labels to condition on
        raise UserError("model=rnn has no conditional form: text datasets carry no class "
                        "labels; model.conditional=true is for image models (mlp, conv, "
                        "resnet)")
    if len(shape) != 1 or vocab_size is None:
        raise UserError(f"model=rnn reads token sequences, but this dataset gives images "
                        f"{tuple(shape)}: use dataset=text, sentences or ptb, or model=mlp, "
                        "conv or resnet for images")
    if cell not in CELLS:
        raise UserError(f"model.cell={cell!r} is not one of {sorted(CELLS)}")
    if condition not in CONDITIONS:
        raise UserError(f"model.condition={condition!r} is not one of {CONDITIONS}")
    for key, value in (("embed_dim", embed_dim), ("hidden", hidden), ("layers", layers)):
        if value <= 0:
            raise UserError(f"model.{key}={value} must be a positive integer")
    for key, value in (("word_dropout", word_dropout), ("embed_dropout", embed_dropout)):
        if not 0 <= value < 1:
            raise UserError(f"model.{key}={value} must be in [0, 1)")
    embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
    length = shape[0]
    encoder = Encoder(embed, hidden, latent_dim, cell, layers, bidirectional, embed_dropout,
                      posterior_outputs or 2 * latent_dim)
    decoder = Decoder(embed, hidden, latent_dim, cell, layers, length, condition, word_dropout,
                      embed_dropout)
    # A VampPrior's pseudo-inputs for this encoder are embedded sequences [L, E].
    return Networks(encoder, decoder, autoregressive=True, soft_shape=(length, embed_dim),
                    out_numel=length * vocab_size)

