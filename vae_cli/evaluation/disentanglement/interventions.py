"""Observations drawn from a dataset's oracle with chosen factors held fixed, and their
posterior means: what the intervention metrics (BetaVAE, FactorVAE scores) are built on.
Factors are drawn as grid positions, each uniformly and independently (the dataset's own
generative distribution), with a CPU generator so the same seed draws the same factors."""

from __future__ import annotations

from collections.abc import Callable

import torch

from vae_cli.data.base import FactorOracle
from vae_cli.runtime.progress import bar

Encoder = Callable[[torch.Tensor], torch.Tensor]  # observations -> posterior means [n, D]
CHUNK = 8192  # observations rendered or looked up at once: bounds memory (32 MB at 64x64)


def varying(oracle: FactorOracle) -> torch.Tensor:
    """Indices of the factors with more than one value: the ones a metric may fix."""
    return torch.tensor([k for k, s in enumerate(oracle.sizes) if s > 1], dtype=torch.long)


def sample_classes(oracle: FactorOracle, n: int, generator: torch.Generator) -> torch.Tensor:
    """long [n, K]: each factor's grid position drawn uniformly."""
    return torch.stack([torch.randint(s, (n,), generator=generator) for s in oracle.sizes], 1)


def represent(oracle: FactorOracle, encode: Encoder, classes: torch.Tensor) -> torch.Tensor:
    """float64 [n, D] posterior means of the observations of grid positions [n, K] (the
    intervention metrics' long loop: tens of thousands of observations, with a bar)."""
    out, progress = [], bar(len(classes), "encoding the oracle's observations", unit="images")
    for part in classes.split(CHUNK):
        out.append(encode(oracle.observe(part)).detach().cpu().double())
        progress.update(len(part))
    progress.close()
    return torch.cat(out)


def fixed_factor_batches(oracle: FactorOracle, n: int, batch_size: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n batches of grid positions [n, batch_size, K], in batch i every row sharing the value
    of factor varying[label_i] (the value of its first row); and the labels [n]."""
    fixable = varying(oracle)
    label = torch.randint(len(fixable), (n,), generator=generator)
    classes = sample_classes(oracle, n * batch_size, generator).view(n, batch_size, -1)
    rows, factor = torch.arange(n), fixable[label]
    classes[rows, :, factor] = classes[rows, :1, factor]
    return classes, label


def paired_batches(oracle: FactorOracle, n: int, batch_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of batches of grid positions [2, n, batch_size, K], the second batch of pair i
    sharing, row by row, the first batch's value of factor varying[label_i] (every other
    factor drawn afresh); and the labels [n]."""
    fixable = varying(oracle)
    label = torch.randint(len(fixable), (n,), generator=generator)
    first = sample_classes(oracle, n * batch_size, generator).view(n, batch_size, -1)
    second = sample_classes(oracle, n * batch_size, generator).view(n, batch_size, -1)
    rows, factor = torch.arange(n), fixable[label]
    second[rows, :, factor] = first[rows, :, factor]
    return torch.stack([first, second]), label
