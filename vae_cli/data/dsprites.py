"""The official dSprites file (Matthey et al. 2017): 737,280 binary 64x64 sprites covering
every combination of shape (3), scale (6), orientation (40), posX (32) and posY (32).

The full set is 3 GB as uint8 (plus a transient copy while splitting): use `subset` to keep a
seeded random sample when memory is tight.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from vae_cli.data.base import ImageData, check_positive
from vae_cli.data.standard import brief
from vae_cli.errors import UserError

log = logging.getLogger(__name__)

FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
FACTOR_NAMES = ["shape", "scale", "orientation", "posX", "posY"]


def find_file(root: str) -> Path:
    base = Path(root).expanduser()
    candidates = [base / FILENAME, base / "dsprites" / FILENAME]
    for p in candidates:
        if p.is_file():
            return p
    raise UserError(f"dSprites not found: looked for {candidates[0].absolute()} and "
                    f"{candidates[1].absolute()}; download {FILENAME} from the dSprites "
                    f"repository (github.com/google-deepmind/dsprites-dataset) into dataset.root")


class DspritesOracle:
    """Looks observations up in the file by grid position: the file holds every combination
    of the factors exactly once, so a table from grid position to row is the whole oracle.
    The images are read again on first use (the dataset keeps only its own subset) and held
    as packed bits, 1/8 of their uint8 size."""

    def __init__(self, path: Path, rows: torch.Tensor, sizes: tuple[int, ...]):
        self.path, self.rows, self.sizes = path, rows, sizes
        self._bits: np.ndarray | None = None
        self._width = 0

    @classmethod
    def of_file(cls, path: Path, classes: np.ndarray) -> DspritesOracle | None:
        """The oracle of a file whose latents_classes cover the grid of shape, scale,
        orientation, posX, posY once each (colour constant); None for any other file."""
        grid = torch.from_numpy(classes[:, 1:6].astype(np.int64))
        sizes = tuple(int(m) + 1 for m in grid.max(0).values)
        if len(np.unique(classes[:, 0])) != 1 or grid.min() < 0 or \
                math.prod(sizes) != len(grid):
            return None
        rows = torch.full((len(grid),), -1, dtype=torch.long)
        rows[_flat(grid, sizes)] = torch.arange(len(grid))
        return None if (rows < 0).any() else cls(path, rows, sizes)

    def observe(self, classes: torch.Tensor) -> torch.Tensor:
        if self._bits is None:
            with np.load(self.path, allow_pickle=False) as npz:
                imgs = npz["imgs"]
            self._width, self._bits = imgs.shape[-1], np.packbits(imgs, axis=-1)
        rows = self.rows[_flat(classes.cpu(), self.sizes)].numpy()
        imgs = np.unpackbits(self._bits[rows], axis=-1, count=self._width)
        return torch.from_numpy(imgs).mul_(255).unsqueeze(1)


def _flat(classes: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Grid positions [n, K] -> row-major flat index into the product of the grids."""
    index = torch.zeros(len(classes), dtype=torch.long)
    for k, size in enumerate(sizes):
        index = index * size + classes[:, k]
    return index


def dsprites(
    root: str = "data",
    subset: int | None = None,
    val_size: int = 10000,
    test_size: int = 10000,
    split_seed: int = 0,
) -> ImageData:
    check_positive(val_size=val_size, test_size=test_size)
    if subset is not None:
        check_positive(subset=subset)
    path = find_file(root)
    try:
        # allow_pickle=False: the file's `metadata` entry is a pickle, and never read here.
        with np.load(path, allow_pickle=False) as npz:
            imgs, values, classes = npz["imgs"], npz["latents_values"], npz["latents_classes"]
    except Exception as e:  # truncated download, wrong file, missing key
        raise UserError(f"cannot read dSprites file {path}: {brief(e)}") from None
    n = len(imgs)
    if imgs.dtype != np.uint8 or imgs.ndim != 3 or {values.shape, classes.shape} != {(n, 6)}:
        raise UserError(f"{path} is not the dSprites file: imgs {imgs.shape}, "
                        f"latents {values.shape}")
    keep = n if subset is None else subset
    if keep > n:
        raise UserError(f"dataset.subset={subset} exceeds the {n} images in {path}")
    if val_size + test_size >= keep:
        raise UserError(f"dataset.val_size + dataset.test_size = {val_size + test_size} leaves "
                        f"no training images out of {keep}")
    # One seeded permutation gives the subset and its split: val, test, then the rest.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))[:keep]
    val_i, test_i, train_i = perm.split([val_size, test_size, keep - val_size - test_size])
    x = torch.from_numpy(imgs)  # shares memory with numpy; the indexing below copies
    # Shape is stored as 1..3 in latents_values: use the class index 0..2 instead, as the
    # procedural `shapes` dataset does, so factor tables of both read the same way.
    f = torch.from_numpy(values[:, 1:6].astype(np.float32))
    f[:, 0] = torch.from_numpy(classes[:, 1].astype(np.float32))
    y = torch.from_numpy(classes[:, 1].astype(np.int64))
    splits = {"train": train_i.sort().values, "val": val_i, "test": test_i}
    # Stored as 0/1: scale to the 0/255 convention of every other dataset.
    images = {k: x[v].mul_(255).unsqueeze(1) for k, v in splits.items()}
    oracle = DspritesOracle.of_file(path, classes)
    if oracle is None:
        log.info("%s does not hold the full factor grid: no BetaVAE/FactorVAE scores", path)
    return ImageData(
        name="dsprites", train=images["train"], val=images["val"], test=images["test"],
        labels={k: y[v] for k, v in splits.items()},
        factors={k: f[v] for k, v in splits.items()},
        factor_names=list(FACTOR_NAMES),
        oracle=oracle,
    )
