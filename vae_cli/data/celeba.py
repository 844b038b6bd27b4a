"""CelebA (aligned and cropped faces) with its official train/valid/test partition.

The 202,599 JPEGs are decoded once, centre-cropped to 140x140 and resized to image_size (the
usual VAE/WAE convention, which removes most background), and cached as one uint8 tensor file:
decoding takes minutes, loading the cache seconds. The 40 binary attributes become `factors`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from vae_cli.data.base import ImageData, load_cache
from vae_cli.data.standard import brief, open_torchvision
from vae_cli.errors import UserError
from vae_cli.runtime.files import save_cache

log = logging.getLogger(__name__)

CROP = 140
_FILES = ["celeba/img_align_celeba", "celeba/list_eval_partition.txt",
          "celeba/list_attr_celeba.txt", "celeba/identity_CelebA.txt",
          "celeba/list_bbox_celeba.txt", "celeba/list_landmarks_align_celeba.txt"]
_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def _decode(folder: Path, files: list[str], size: int, batch: int = 256) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for start in range(0, len(files), batch):
        names = files[start:start + batch]
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders
                warnings.simplefilter("ignore", DeprecationWarning)
                raw = [read_file(str(folder / f)) for f in names]
                imgs = decode_jpeg(raw, mode=ImageReadMode.RGB)
        except Exception as e:  # find the culprit only on failure: one by one is slower
            for f in names:
                try:
                    decode_jpeg(read_file(str(folder / f)), mode=ImageReadMode.RGB)
                except Exception as e1:
                    raise UserError(f"cannot decode CelebA image {folder / f}: "
                                    f"{brief(e1)}") from None
            raise UserError(f"cannot decode CelebA images in {folder}: {brief(e)}") from None
        crops = torch.stack([F.center_crop(im, [CROP, CROP]) for im in imgs])
        out[start:start + len(names)] = F.resize(crops, [size, size], antialias=True)
        if (start // batch) % 40 == 39:
            log.info("decoded %d / %d CelebA images", start + len(names), len(files))
    return out


def celeba(root: str = "data", download: bool = False, image_size: int = 64) -> ImageData:
    if not 8 <= image_size <= CROP:
        raise UserError(f"dataset.image_size={image_size} must be in [8, {CROP}] (the images "
                        f"are centre-cropped to {CROP}x{CROP} first)")
    path = Path(root).expanduser() / "celeba" / f"celeba_{image_size}.pt"
    data = load_cache(path)
    if data is None or not {"train", "val", "test", "attr_names"} <= set(data):
        import torchvision.datasets as tvd

        sets = open_torchvision(
            "CelebA", root, download, _FILES,
            lambda r, dl: {k: tvd.CelebA(r, split=v, target_type="attr", download=dl)
                       for k, v in _SPLITS.items()})
        folder = Path(root).expanduser() / "celeba" / "img_align_celeba"
        log.info("decoding CelebA once to %dx%d uint8 (cached at %s)", image_size, image_size,
                 path)
        # The attribute header line ends with a space, which the csv parser keeps as a name.
        data = {"attr_names": [a for a in sets["train"].attr_names if a]}
        for k, ds in sets.items():
            data[k] = _decode(folder, list(ds.filename), image_size)
            data[f"attr_{k}"] = ds.attr.float()
        save_cache(path, data, "the dataset cache", "continuing without it")
    return ImageData(
        name="celeba", train=data["train"], val=data["val"], test=data["test"],
        factors={k: data[f"attr_{k}"] for k in _SPLITS}, factor_names=data["attr_names"],
    )
