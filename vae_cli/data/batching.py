"""Batches from a uint8 tensor held whole on the training device, or from a streamed split
(``data.stream``) that decodes the same positions in DataLoader workers.

Indexing a permutation of an in-memory tensor replaces the per-item PIL pipeline and the
DataLoader, which dominate the step time of small VAEs on CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from vae_cli.data.stream import ImageStream, is_stream
from vae_cli.tokens import lengths, trim

BUCKET_POOL = 50  # batches sorted by length together: similar lengths, still a mixed corpus


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


def as_input(x: torch.Tensor) -> torch.Tensor:
    """What the model reads: images as float in [0, 1]; token ids trimmed to the batch's
    longest sequence."""
    return to_unit(x) if x.dtype == torch.uint8 else trim(x)


def shuffled(x: torch.Tensor, batch_size: int, generator: torch.Generator,
             binarize: bool = False, start: int = 0, shard: tuple[int, int] = (0, 1),
             labels: torch.Tensor | None = None, bucket: bool = False
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Full batches (x, y) in a fresh random order (drop_last: batch statistics stay
    comparable); y holds the examples' labels when ``labels`` is given, else None.

    The permutation is drawn on the CPU from ``generator`` so the order is reproducible and
    resumable independently of the device; binarization draws from the device's RNG.
    ``start`` skips that many batches of this permutation (resuming mid-epoch). With
    ``shard=(rank, world)`` each global batch is cut into ``world`` slices and this rank's
    is yielded; binarization is drawn for the global batch, as one process would. Labels
    are indexed by the same permutation and slice: they draw nothing, so batch order and
    random streams are those of an unlabelled run.
    ``bucket`` (token ids) regroups the permutation by length (see ``by_length``).
    """
    rank, world = shard
    local = batch_size // world
    seed = epoch_seed(generator) if is_stream(x) else None
    perm = torch.randperm(len(x), generator=generator)
    lo, hi = rank * local, (rank + 1) * local
    if seed is not None:
        yield from streamed(x, perm, batch_size, start, (lo, hi), labels, binarize, seed)
        return
    if bucket:
        perm = by_length(perm, lengths(x).cpu(), batch_size, generator)
    perm = perm.to(x.device)
    for i in range(start * batch_size, len(x) - batch_size + 1, batch_size):
        y = None if labels is None else labels[perm[i + lo:i + hi]]
        if binarize:
            yield torch.bernoulli(as_input(x[perm[i:i + batch_size]]))[lo:hi], y
        else:
            yield as_input(x[perm[i + lo:i + hi]]), y


def epoch_seed(generator: torch.Generator) -> int:
    """A seed named by the generator's state at the epoch's start, drawing nothing from it:
    a streamed epoch's augmentation, while its order stays the in-memory path's."""
    state = generator.get_state().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(state).digest()[:7], "little")


def streamed(x: ImageStream, perm: torch.Tensor, batch_size: int, start: int,
             part: tuple[int, int], labels: torch.Tensor | None, binarize: bool, seed: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``shuffled``'s batches of a streamed split: the same positions, decoded by its
    workers; this rank's ``part`` of each global batch (binarized per part)."""
    lo, hi = part
    starts = range(start * batch_size, len(x) - batch_size + 1, batch_size)
    plan = [perm[i + lo:i + hi] for i in starts]
    for taken, xb in zip(plan, x.batches([p.tolist() for p in plan], seed), strict=True):
        xb = as_input(xb)
        y = None if labels is None else labels[taken.to(labels.device)]
        yield (torch.bernoulli(xb) if binarize else xb), y


def by_length(perm: torch.Tensor, n: torch.Tensor, batch_size: int,
              generator: torch.Generator) -> torch.Tensor:
    """``perm`` regrouped so that each batch holds lines of similar length ``n``: pools of
    BUCKET_POOL batches in the drawn order, each sorted by length and cut into batches,
    the batches then shuffled. Trimmed batches then carry little padding, and the
    recurrent networks take fewer steps. Drawn from ``generator`` after the permutation,
    so the order stays reproducible and resumable; the lines drop_last leaves out stay last."""
    used = len(perm) // batch_size * batch_size
    pools = perm[:used].split(BUCKET_POOL * batch_size)
    batches = torch.cat([p[n[p].sort(stable=True).indices] for p in pools]).view(-1, batch_size)
    order = torch.randperm(len(batches), generator=generator)
    return torch.cat([batches[order].flatten(), perm[used:]])


def ordered(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Every example once, in order (evaluation)."""
    if is_stream(x):
        plan = [range(i, min(i + batch_size, len(x))) for i in range(0, len(x), batch_size)]
        yield from map(as_input, x.batches(plan))
        return
    for i in range(0, len(x), batch_size):
        yield as_input(x[i:i + batch_size])


def gathered(x: torch.Tensor | ImageStream, plan: list[torch.Tensor]
             ) -> Iterator[torch.Tensor]:
    """``x[idx]`` (uint8 or token ids) for each index tensor of ``plan``; a streamed split
    decodes them in its workers."""
    if is_stream(x):
        yield from x.batches([idx.tolist() for idx in plan])
        return
    for idx in plan:
        yield x[idx.to(x.device)]


def labelled(x: torch.Tensor, labels: torch.Tensor | None, batch_size: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``ordered`` batches with their labels (None when ``labels`` is None)."""
    for i, xb in enumerate(ordered(x, batch_size)):
        yield xb, None if labels is None else labels[i * batch_size:(i + 1) * batch_size]
