"""Data parallelism as the maths sees it: the noise of the global batch, and statistics
summed over ranks.

Under torchrun each rank holds a slice of a global batch. For N ranks to train exactly as
one process on the whole batch would, with their random streams in step, every rank draws
the noise of the whole global batch and keeps its own rows (``Shard``, ``global_noise``,
used by ``VAE.rsample``); a family that keeps statistics of the batch (VQ's moving averages)
is handed a function that sums a tensor over ranks (``Posterior.distribute``). One process
is ``WHOLE``: the same code with nothing sliced. Nothing here knows of processes: the
training recipe says which slice this is and how to sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# noise(draw, *event): this rank's rows [*lead, B, *event] of noise drawn by ``draw``
# (torch.randn, torch.rand) for the whole global batch.
Noise = Callable[..., torch.Tensor]
# Sums a tensor over the ranks (the identity in one process).
AllSum = Callable[[torch.Tensor], torch.Tensor]


class Shard(NamedTuple):
    """This process's slice of a global batch under data parallelism: (rank, world)."""

    rank: int = 0
    world: int = 1


WHOLE = Shard()


def global_noise(shard: Shard, lead: tuple[int, ...], rows: int,
                 device: torch.device) -> Noise:
    """Noise for ``rows`` examples (after ``lead`` sample dimensions): the global batch's
    drawn whole, this shard's rows kept."""

    def noise(draw: Callable[..., torch.Tensor], *event: int) -> torch.Tensor:
        eps = draw(*lead, shard.world * rows, *event, device=device)
        return eps.narrow(len(lead), shard.rank * rows, rows)

    return noise
