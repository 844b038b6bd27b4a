"""A user's own directory of images (searched recursively), as one uint8 tensor.

When every image lies in a sub-folder, the sub-folders are the classes (torchvision's
ImageFolder layout: label i is the i-th top-level sub-folder in sorted order); a folder with
images at its top level has no labels.

Every image is resized so its shorter side is image_size, then centre-cropped to a square:
aspect ratios are kept and nothing is padded. The decoded tensor is cached under <root>/folder,
keyed by the file list, sizes and modification times, so editing the folder rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import torch

from vae_cli.data.base import ImageData, load_cache, seeded_split
from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import save_cache

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Pixels an image may decode to (8192 x 8192): a small file can claim a huge size (a
# decompression bomb), so the size in its header is checked before anything is decoded.
MAX_PIXELS = 2**26
CACHE_VERSION = 1


def _check_size(path: Path) -> None:
    """Refuse an image whose header claims more than MAX_PIXELS, before decoding it."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # read the size, not refuse
    try:
        with Image.open(path) as im:
            w, h = im.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if w * h > MAX_PIXELS:
        raise UserError(f"{path} would decode to {w}x{h} pixels, over the limit of "
                        f"{MAX_PIXELS} (8192x8192); resize it or leave it out")


def _decode(path: Path, channels: int) -> torch.Tensor:
    """uint8 [channels, H, W]; torchvision.io does png/jpeg/webp, PIL the rest (bmp)."""
    _check_size(path)
    if path.suffix.lower() == ".bmp":
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        t = torch.from_numpy(arr.copy())
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        # EXIF orientation: phone photos are often stored sideways with a rotation tag.
        img = decode_image(str(path), mode=mode, apply_exif_orientation=True)
    # The webp decoder ignores GRAY and returns RGB(A), so fix the channel count here.
    img = img[:3] if img.shape[0] == 4 else img[:1] if img.shape[0] == 2 else img
    if img.shape[0] != channels:
        img = F.rgb_to_grayscale(img) if channels == 1 else img.expand(3, -1, -1)
    return img


def _load(files: list[Path], channels: int, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    out = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            img = _decode(f, channels)
        except UserError:
            raise
        except Exception as e:
            # torchvision prefixes its messages with a C++ source location: drop it.
            msg = re.sub(r"^.*?\.cpp:\d+, ", "", one_line(e))
            raise UserError(f"cannot decode image {f}: {msg}") from None
        img = F.resize(img, [size], antialias=True)  # one int: the shorter side
        out[i] = F.center_crop(img, [size, size])
        if i % 5000 == 4999:
            log.info("decoded %d / %d images", i + 1, len(files))
    return out


def class_labels(base: Path, files: list[Path]) -> torch.Tensor | None:
    """Each file's top-level sub-folder as a class id, or None when any file has none."""
    tops = [f.relative_to(base).parts for f in files]
    if any(len(parts) < 2 for parts in tops):
        return None
    names = sorted({parts[0] for parts in tops})
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[parts[0]] for parts in tops], dtype=torch.long)


def folder(
    path: str | None = None,
    root: str = "data",
    channels: int = 3,
    image_size: int = 64,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    cache: bool = True,
) -> ImageData:
    if path is None:
        raise UserError("dataset=folder needs an image directory: set dataset.path=<dir>")
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
    base = Path(path).expanduser()
    if not base.is_dir():
        raise UserError(f"dataset.path={path}: {base.absolute()} is not a directory")
    # Sorted so the seeded split names the same images on every machine and file system.
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(e[1:] for e in EXTENSIONS)}) found under "
                        f"{base.absolute()}")
    n = len(files)
    n_val, n_test = (max(1, round(n * f)) for f in (val_fraction, test_fraction))
    if n - n_val - n_test < 1:
        raise UserError(f"{base.absolute()} holds {n} images: too few to split into "
                        f"train, val and test (need at least 3)")

    stats = [(str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = {"v": CACHE_VERSION, "dir": str(base.resolve()), "files": stats, "c": channels,
           "size": image_size}
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    cache_path = Path(root).expanduser() / "folder" / f"folder_{digest}.pt"
    data = load_cache(cache_path) if cache else None
    if data is None or "images" not in data or len(data["images"]) != n:
        log.info("decoding %d images from %s", n, base)
        data = {"images": _load(files, channels, image_size)}
        if cache:
            save_cache(cache_path, data, "the dataset cache", "continuing without it")
    images = data["images"]
    train_idx, val_idx, test_idx = seeded_split(n, [-1, n_val, n_test], split_seed)
    y = class_labels(base, files)
    labels = {} if y is None else {"train": y[train_idx], "val": y[val_idx],
                                   "test": y[test_idx]}
    return ImageData(name="folder", train=images[train_idx], val=images[val_idx],
                     test=images[test_idx], labels=labels)
