"""Splits decoded on the fly, for image sets bigger than memory (``dataset.stream=true``).

A streamed split is the list of its items' locations (image files, or samples in
WebDataset shards) and stands in for the uint8 [N, C, H, W] tensor of the in-memory path
wherever the code reads a split: ``len``, ``shape``, ``dtype``, ``device`` and indexing
(``x[a:b]``, ``x[index_tensor]`` decode those items). The batch iterators of
``data.batching`` hand it the same index lists they would cut from a tensor, and
``batches`` decodes them in ``torch.utils.data.DataLoader`` workers, prefetching ahead of
the step. So the order of an epoch is the in-memory path's (a function of the seed and the
epoch), a resume skips batches by index without decoding them, and data-parallel ranks
take their slices of each global batch, as they do from a tensor.

Training batches may be augmented (``augment=true``: a random square crop along the longer
side and a horizontal flip), drawn per item from a seed fixed by the epoch's order, so
they are the same with any number of workers and after a resume. Every other read is the
deterministic centre crop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from vae_cli.data.images import decode, decode_failure
from vae_cli.errors import UserError

log = logging.getLogger(__name__)

OnError = Literal["skip", "refuse"]
RETRIES = 16  # unreadable items in a row before skipping gives up


class Source(Protocol):
    """Random access to encoded items: what a streamed split reads."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> Path | bytes:
        """Item i's encoded image: its file, or its bytes."""
        ...

    def name(self, i: int) -> str:
        """Item i for a message: its file, or its shard and key."""
        ...


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Encoded image -> uint8 [channels, size, size]: the shorter side resized to ``size``,
    then a square crop (centred, or at a position drawn from ``rng``) and, with ``rng``, a
    horizontal flip half of the time."""

    channels: int
    size: int

    def __call__(self, raw: Path | bytes, name: str,
                 rng: torch.Generator | None = None) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        img = F.resize(decode(raw, self.channels, name), [self.size], antialias=True)
        h, w = img.shape[1:]
        if rng is None:
            return F.center_crop(img, [self.size, self.size])
        top, left = (int(torch.randint(n - self.size + 1, (), generator=rng)) for n in (h, w))
        img = img[:, top:top + self.size, left:left + self.size]
        return img.flip(-1) if torch.rand((), generator=rng) < 0.5 else img


@dataclasses.dataclass
class Loading:
    """How batches are fetched: DataLoader workers (0: in this process), batches each
    worker prepares ahead, pinned host memory for a CUDA device."""

    workers: int = 2
    prefetch: int = 2
    on_error: OnError = "skip"


class Items(Dataset):
    """What the workers hold: the split's items and how to decode them, as plain values (a
    worker started by spawn or forkserver unpickles it; nothing refers back to a loader)."""

    def __init__(self, source: Source, ids: list[int], decoder: Decoder, augment: bool,
                 on_error: OnError):
        self.source, self.ids, self.decoder = source, ids, decoder
        self.augment, self.on_error = augment, on_error

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, request: tuple[int, int]) -> tuple[torch.Tensor, str]:
        """(position, seed) -> (image, ""); with on_error=skip an unreadable item gives the
        next readable one in the split and its own message; what cannot be given is zeros
        and the message marked "!" (the loop stops on it)."""
        position, seed = request
        rng = torch.Generator().manual_seed(seed) if self.augment and seed >= 0 else None
        failures = []
        for step in range(RETRIES if self.on_error == "skip" else 1):
            i = self.ids[(position + step) % len(self)]
            try:
                image = self.decoder(self.source.read(i), self.source.name(i), rng)
                return image, failures[0] if failures else ""
            except Exception as e:  # noqa: BLE001 - any decoder's failure names the item
                failures.append(decode_failure(self.source.name(i), e))
        size = self.decoder.size
        return torch.zeros(self.decoder.channels, size, size, dtype=torch.uint8), \
            "!" + failures[0]


class ImageStream:
    """One split: the items ``ids`` of ``source``, decoded on demand (see the module)."""

    dtype = torch.uint8
    ndim = 4

    def __init__(self, source: Source, ids: torch.Tensor, decoder: Decoder, loading: Loading,
                 augment: bool = False, device: torch.device | str = "cpu"):
        self.items = Items(source, ids.long().tolist(), decoder, augment, loading.on_error)
        self.source, self.ids, self.decoder = source, ids.long().cpu(), decoder
        self.loading, self.augment, self.device = loading, augment, torch.device(device)
        self.skipped = 0  # unreadable items replaced so far
        self._loader: DataLoader | None = None
        self._plan = _Plan()

    # -- the tensor the in-memory path holds ------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> torch.Size:
        s = self.decoder.size
        return torch.Size([len(self), self.decoder.channels, s, s])

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def to(self, device: torch.device | str) -> ImageStream:
        moved = ImageStream(self.source, self.ids, self.decoder, self.loading, self.augment,
                            device)
        moved.skipped = self.skipped
        return moved

    def __getitem__(self, key: Any) -> torch.Tensor:
        """``x[i]``, ``x[a:b]``, ``x[index_tensor]``: those items decoded here, centred,
        an unreadable one replaced (or refused) as in batches."""
        if isinstance(key, int):
            return self[[key]][0]
        positions = torch.arange(len(self))[key.cpu() if torch.is_tensor(key) else key]
        images, problems = [], []
        for i in positions.flatten().tolist():
            image, problem = self.items[(i, -1)]
            images.append(image)
            problems.append(problem)
        self._account(problems)
        out = torch.stack(images) if images else torch.empty(0, *self.shape[1:],
                                                             dtype=torch.uint8)
        return out.to(self.device)

    def identity(self) -> str:
        """What names this split's data for caches keyed by it: its items and decoding."""
        names = "\n".join(self.source.name(i) for i in self.items.ids)
        return f"{self.decoder} {hashlib.sha256(names.encode()).hexdigest()}"

    # -- batches decoded by DataLoader workers ---------------------------------------------
    def batches(self, plan: Sequence[Sequence[int]], seed: int | None = None
                ) -> Iterator[torch.Tensor]:
        """uint8 batches on this split's device, one per position list of ``plan``, decoded
        by the workers ahead of use; ``seed`` (the epoch's) draws the augmentation."""
        self._plan.batches = [[(int(p), item_seed(seed, int(p))) for p in batch]
                              for batch in plan]
        for images, problems in self._loader_once():
            self._account(problems)
            yield images.to(self.device, non_blocking=True)

    def _account(self, problems: Sequence[str]) -> None:
        """Replaced items are counted and said; an item that could not be replaced (or any,
        with on_error=refuse) stops the run in one line naming it."""
        fatal = next((p[1:] for p in problems if p.startswith("!")), None)
        if fatal:
            raise UserError(stopped_at(fatal, self.loading.on_error))
        bad = [p for p in problems if p]
        if bad:
            self.skipped += len(bad)
            log.warning("%s; replaced by the next readable image (%d so far)", bad[0],
                        self.skipped)

    def _loader_once(self) -> DataLoader:
        """One DataLoader per split and process, kept across epochs (its workers too): only
        its batch plan changes."""
        if self._loader is None:
            import PIL.Image  # noqa: F401 - the decoders, imported once before workers fork
            import torchvision.transforms.v2.functional  # noqa: F401

            workers = self.loading.workers
            self._loader = DataLoader(
                self.items, batch_sampler=self._plan, num_workers=workers,
                collate_fn=_collate, pin_memory=self.device.type == "cuda",
                prefetch_factor=self.loading.prefetch if workers else None,
                persistent_workers=workers > 0, multiprocessing_context=worker_start(workers),
                # its own generator: starting workers draws a seed, not from the global
                # stream that the model's noise comes from
                generator=torch.Generator(), worker_init_fn=_worker_start)
        return self._loader


def stopped_at(failure: str, on_error: OnError) -> str:
    """The line that stops a run at an unreadable image: with skip, when the items after it
    are unreadable too."""
    if on_error == "refuse":
        return f"{failure}; dataset.on_error=skip replaces unreadable images"
    return f"{failure} (and the {RETRIES - 1} items after it)"


def worker_start(workers: int) -> str | None:
    """fork on Linux, as torch's DataLoader has long defaulted to there: a worker starts in
    milliseconds with the parent's imports (Python 3.14 made forkserver the default, whose
    fresh server imports torch again: seconds per start). Elsewhere the platform's own."""
    return "fork" if workers and sys.platform.startswith("linux") else None


def _worker_start(_: int) -> None:
    """A worker ends with the process it serves, at once, even one killed with SIGKILL
    (Linux: the parent-death signal), and holds none of its folder locks, so a restarted
    run finds its folder free."""
    from vae_cli.runtime.files import forget_locks

    forget_locks()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the line above
            os._exit(0)


class _Plan:
    """The batch sampler: the (position, seed) lists of the epoch being read."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def item_seed(seed: int | None, position: int) -> int:
    """The augmentation seed of one item in one epoch (-1: none): a function of the two
    alone, so batch boundaries, workers and resumes do not change it."""
    if seed is None:
        return -1
    return (seed * 0x9E3779B1 + position * 0x85EBCA77 + 1) % 2**62


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """torch's own collation of the images: in a worker it stacks them straight into
    shared memory, which the training process then reads without a copy."""
    from torch.utils.data import default_collate

    return default_collate([image for image, _ in items]), [problem for _, problem in items]


def is_stream(x: object) -> bool:
    return isinstance(x, ImageStream)


def streaming(workers: int, prefetch: int, on_error: str, augment: bool) -> Loading:
    """The streaming keys of a dataset config, checked."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise UserError(f"dataset.workers={workers!r} must be an integer >= 0 (0: decode in "
                        "the training process)")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise UserError(f"dataset.prefetch={prefetch!r} must be an integer >= 1")
    if on_error not in ("skip", "refuse"):
        raise UserError(f"dataset.on_error={on_error!r} is not skip or refuse")
    if not isinstance(augment, bool):
        raise UserError(f"dataset.augment={augment!r} must be true or false")
    return Loading(workers, prefetch, on_error)


def streamed_data(name: str, source: Source, split: dict[str, torch.Tensor],
                  decoder: Decoder, loading: Loading, augment: bool,
                  labels: torch.Tensor | None) -> Any:
    """An ImageData whose splits stream the items ``split`` names (augmented: train only)."""
    from vae_cli.data.base import ImageData

    return ImageData(
        name=name, **{s: ImageStream(source, ids, decoder, loading, augment and s == "train")
                      for s, ids in split.items()},
        labels={} if labels is None else {s: labels[ids] for s, ids in split.items()})
