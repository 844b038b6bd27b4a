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

from vae_cli.data.base import (
    ImageData,
    check_images_settings,
    load_cache,
    three_way,
)
from vae_cli.data.stream import Decoder, streamed_data, streaming
from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import save_cache

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Pixels an image may decode to (8192 x 8192): a small file can claim a huge size (a
# decompression bomb), so the size in its header is checked before anything is decoded.
MAX_PIXELS = 2**26
CACHE_VERSION = 1


def _opened(src: Path | bytes):
    import io

    from PIL import Image

    return Image.open(src if isinstance(src, Path) else io.BytesIO(src))


def _check_size(src: Path | bytes, name: str) -> None:
    """Refuse an image whose header claims more than MAX_PIXELS, before decoding it."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # read the size, not refuse
    try:
        with _opened(src) as im:
            w, h = im.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if w * h > MAX_PIXELS:
        raise UserError(f"{name} would decode to {w}x{h} pixels, over the limit of "
                        f"{MAX_PIXELS} (8192x8192); resize it or leave it out")


def decode(src: Path | bytes, channels: int, name: str = "") -> torch.Tensor:
    """uint8 [channels, H, W] from a file or its bytes; torchvision.io does png/jpeg/webp,
    PIL the rest (bmp)."""
    name = name or str(src)
    _check_size(src, name)
    if (src[:2] if isinstance(src, bytes) else src.suffix.lower()) in (b"BM", ".bmp"):
        import numpy as np

        with _opened(src) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        t = torch.from_numpy(arr.copy())
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    raw = str(src) if isinstance(src, Path) else torch.frombuffer(bytearray(src), dtype=torch.uint8)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        # EXIF orientation: phone photos are often stored sideways with a rotation tag.
        img = decode_image(raw, mode=mode, apply_exif_orientation=True)
    # The webp decoder ignores GRAY and returns RGB(A), so fix the channel count here.
    img = img[:3] if img.shape[0] == 4 else img[:1] if img.shape[0] == 2 else img
    if img.shape[0] != channels:
        img = F.rgb_to_grayscale(img) if channels == 1 else img.expand(3, -1, -1)
    return img


def decode_failure(name: str, e: Exception) -> str:
    """One line for an image that did not decode: its name and the decoder's message,
    without torchvision's C++ source location prefix."""
    message = re.sub(r"^.*?\.cpp:\d+, ", "", one_line(e))
    return f"cannot decode image {name}: {message}"


def _load(files: list[Path], channels: int, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    out = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            img = decode(f, channels)
        except UserError:
            raise
        except Exception as e:
            raise UserError(decode_failure(str(f), e)) from None
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


class Files:
    """A folder's images as a streamed split's source (data.stream): each item a file."""

    def __init__(self, files: list[Path]):
        self.files = [str(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> Path:
        return Path(self.files[i])

    def name(self, i: int) -> str:
        return self.files[i]


def folder(
    path: str | None = None,
    root: str = "data",
    channels: int = 3,
    image_size: int = 64,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    cache: bool = True,
    stream: bool = False,
    workers: int = 2,
    prefetch: int = 2,
    augment: bool = False,
    on_error: str = "skip",
) -> ImageData:
    if path is None:
        raise UserError("dataset=folder needs an image directory: set dataset.path=<dir>")
    check_images_settings(channels, image_size, val_fraction, test_fraction)
    base = Path(path).expanduser()
    if not base.is_dir():
        raise UserError(f"dataset.path={path}: {base.absolute()} is not a directory")
    # Sorted so the seeded split names the same images on every machine and file system.
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(e[1:] for e in EXTENSIONS)}) found under "
                        f"{base.absolute()}")
    split = three_way(len(files), val_fraction, test_fraction, split_seed,
                      f"{base.absolute()} holds {len(files)} images")
    y = class_labels(base, files)
    if stream:
        loading = streaming(workers, prefetch, on_error, augment)
        source, decoder = Files(files), Decoder(channels, image_size)
        return streamed_data("folder", source, split, decoder, loading, augment, y)
    images = decoded(base, files, root, channels, image_size, cache)
    return ImageData(name="folder", **{s: images[idx] for s, idx in split.items()},
                     labels={} if y is None else {s: y[idx] for s, idx in split.items()})


def decoded(base: Path, files: list[Path], root: str, channels: int, image_size: int,
            cache: bool) -> torch.Tensor:
    """Every image decoded, from the cache when the files are unchanged."""
    stats = [(str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = {"v": CACHE_VERSION, "dir": str(base.resolve()), "files": stats, "c": channels,
           "size": image_size}
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    cache_path = Path(root).expanduser() / "folder" / f"folder_{digest}.pt"
    data = load_cache(cache_path) if cache else None
    if data is None or "images" not in data or len(data["images"]) != len(files):
        log.info("decoding %d images from %s", len(files), base)
        data = {"images": _load(files, channels, image_size)}
        if cache:
            save_cache(cache_path, data, "the dataset cache", "continuing without it")
    return data["images"]
