"""The one container every dataset function returns, plus small shared helpers.

Images stay uint8 [N, C, H, W] end to end: 4x less memory than float, so whole datasets fit
on the training device and batches are converted (and, for binarized data, resampled) there.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _none_per_split() -> dict[str, torch.Tensor | None]:
    return {s: None for s in SPLITS}


class FactorOracle(Protocol):
    """Ground truth on demand, for datasets whose factors form a grid: the observation for any
    chosen combination of factor values. The intervention metrics (BetaVAE and FactorVAE
    scores) need it to hold one factor fixed while the others vary."""

    sizes: tuple[int, ...]  # values per factor, in the order of factor_names

    def observe(self, classes: torch.Tensor) -> torch.Tensor:
        """long [n, K] grid positions (0..sizes[k]-1) -> uint8 images [n, C, H, W] on the
        CPU."""
        ...


@dataclass
class Splits:
    """Train/val/test tensors held whole on one device, with optional per-example labels
    and ground-truth factors: what every dataset function returns (images or text)."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    # True: the trainer resamples Bernoulli(x/255) per TRAIN batch (dynamic binarization);
    # val/test were binarized once here with a fixed seed, so their values are exactly 0/255.
    binarize: bool = False
    labels: dict[str, torch.Tensor | None] = field(default_factory=_none_per_split)
    factors: dict[str, torch.Tensor | None] = field(default_factory=_none_per_split)
    factor_names: list[str] = field(default_factory=list)
    vocab: Vocab | None = None  # token sequences: the vocabulary that made the ids
    oracle: FactorOracle | None = None  # factor grids: observations for chosen factor values

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    @property
    def num_classes(self) -> int | None:
        """How many classes the labels name (ids 0..C-1, counted over every split), or None
        unless every split is labelled: what a conditional model is built for."""
        if any(self.labels.get(s) is None for s in SPLITS):
            return None
        return max(int(self.labels[s].max()) + 1 for s in SPLITS if len(self.labels[s]))

    def check_class_ids(self) -> None:
        """Labels a conditional model is built on name classes 0..C-1, each seen somewhere:
        a stray id (255 in an IDX file) would silently add the classes before it."""
        ids = torch.cat([self.labels[s].flatten() for s in SPLITS]).unique()
        if len(ids) and (int(ids.min()) < 0 or len(ids) != int(ids.max()) + 1):
            raise UserError(f"{self.name}'s labels are {len(ids)} class ids from "
                            f"{int(ids.min())} to {int(ids.max())}, not 0..{len(ids) - 1}: a "
                            "conditional model would learn classes no example has; fix the "
                            "labels")

    def labels_for(self, name: str, conditional: bool = True) -> torch.Tensor | None:
        """What a model reads besides a split's examples: the class ids for a conditional
        model (one line where there are none), None for an unconditional one."""
        if not conditional:
            return None
        labels = self.labels.get(name)
        if labels is None:
            raise UserError(f"{self.name} has no class labels for its {name} split; a "
                            "conditional model reads them")
        return labels

    def to(self, device: torch.device | str):
        def move(d: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
            return {k: None if v is None else v.to(device) for k, v in d.items()}

        return dataclasses.replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device),
            labels=move(self.labels), factors=move(self.factors),
        )


@dataclass
class ImageData(Splits):
    """uint8 [N, C, H, W] images, 0..255."""

    def __post_init__(self) -> None:
        shape = check_images(self.train, f"{self.name} train").shape[1:]
        for s in ("val", "test"):
            if check_images(self.split(s), f"{self.name} {s}").shape[1:] != shape:
                raise UserError(f"{self.name}: {s} images are {tuple(self.split(s).shape[1:])}, "
                                f"train images are {tuple(shape)}")
        for kind in (self.labels, self.factors):
            for s in SPLITS:
                t = kind.setdefault(s, None)
                if t is not None and len(t) != len(self.split(s)):
                    raise UserError(f"{self.name}: {len(t)} labels/factors for "
                                    f"{len(self.split(s))} {s} images")

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)


def check_images(t: torch.Tensor, name: str) -> torch.Tensor:
    """Reject what would otherwise fail deep inside the trainer with an obscure error."""
    from vae_cli.data.stream import is_stream

    if not (isinstance(t, torch.Tensor) or is_stream(t)) or t.dtype != torch.uint8:
        raise UserError(f"{name}: expected a uint8 image tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim != 4:
        raise UserError(f"{name}: expected images shaped [N, C, H, W], got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise UserError(f"{name}: the dataset split is empty")
    if t.shape[1] not in (1, 3):
        raise UserError(f"{name}: expected 1 or 3 channels, got {t.shape[1]}")
    return t


def binarize_once(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One fixed Bernoulli(x/255) draw, as uint8 0/255: the evaluation convention for
    binarized MNIST (a static test set, while training resamples every batch)."""
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (u < x.float() / 255).to(torch.uint8) * 255


def seeded_split(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """Disjoint random index sets of the given sizes (the rest goes to the first one when
    sizes[0] is -1); a CPU generator so the split is the same on every machine."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if sizes[0] == -1:
        sizes = [n - sum(sizes[1:]), *sizes[1:]]
    return list(torch.split(perm, sizes))


def check_images_settings(channels: int, image_size: int, val_fraction: float,
                          test_fraction: float) -> None:
    """The keys a dataset of the user's own images shares (folder, webdataset)."""
    if channels not in (1, 3):
        raise UserError(f"dataset.channels={channels} must be 1 (grey) or 3 (RGB)")
    if image_size < 4:
        raise UserError(f"dataset.image_size={image_size} must be at least 4")
    for key, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < v < 1:
            raise UserError(f"dataset.{key}={v} must be a fraction in (0, 1)")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"dataset.val_fraction + dataset.test_fraction = "
                        f"{val_fraction + test_fraction} leaves no training images")


def three_way(n: int, val_fraction: float, test_fraction: float, seed: int,
              holds: str) -> dict[str, torch.Tensor]:
    """Seeded train/val/test index sets, val and test at least one example each."""
    n_val, n_test = (max(1, round(n * f)) for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise UserError(f"{holds}: too few to split into train, val and test (need at "
                        "least 3)")
    return dict(zip(SPLITS, seeded_split(n, [-1, n_val, n_test], seed), strict=True))


def check_positive(**kwargs: int | float) -> None:
    for k, v in kwargs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise UserError(f"dataset.{k} must be a positive number, got {v!r}")


def load_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """A dataset's decoded tensors saved by an earlier run (runtime.files.save_cache)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, type(e).__name__)
        return None
