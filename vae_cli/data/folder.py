"""A user's own directory of images (searched recursively), as one uint8 tensor.

When every image lies in a sub-folder, the sub-folders are the classes (torchvision's
ImageFolder layout: label i is the i-th top-level sub-folder in sorted order); a folder with
images at its top level has no labels.

Every image is resized so its shorter side is image_size, then centre-cropped to a square:
aspect ratios are kept and nothing is padded. The decoded tensor is cached under <root>/folder,
keyed by the file list, sizes and modification times, so editing the folder rebuilds it. An
image that does not decode is replaced or refused as ``on_error`` says, as when streamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from vae_cli.data.base import (
    ImageData,
    check_images_settings,
    load_cache,
    three_way,
)
from vae_cli.data.images import decode, decode_failure
from vae_cli.data.stream import RETRIES, Decoder, stopped_at, streamed_data, streaming
from vae_cli.errors import UserError
from vae_cli.runtime.files import save_cache

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_VERSION = 2  # 2: PNGs by Pillow (grey from colour may move by 1), failures kept


def _load(files: list[Path], channels: int, size: int, on_error: str
          ) -> tuple[torch.Tensor, dict[int, str]]:
    """Every image decoded and centre-cropped; one that does not decode stays zeros and its
    failure is returned by index (with on_error=refuse the first one stops here)."""
    from torchvision.transforms.v2 import functional as F

    out = torch.zeros(len(files), channels, size, size, dtype=torch.uint8)
    unreadable = {}
    for i, f in enumerate(files):
        try:
            img = decode(f, channels)
        except UserError:  # a decompression bomb is refused before any work, not skipped
            raise
        except Exception as e:  # noqa: BLE001 - any decoder's failure names the file
            unreadable[i] = decode_failure(str(f), e)
            if on_error == "refuse":
                raise UserError(stopped_at(unreadable[i], on_error)) from None
            continue
        img = F.resize(img, [size], antialias=True)  # one int: the shorter side
        out[i] = F.center_crop(img, [size, size])
        if i % 5000 == 4999:
            log.info("decoded %d / %d images", i + 1, len(files))
    return out, unreadable


def readable(split: dict[str, torch.Tensor], unreadable: dict[int, str], on_error: str
             ) -> dict[str, torch.Tensor]:
    """The split with each unreadable image replaced by the next readable one of its split,
    as a streamed split replaces it, so both give the same run; or one line naming it."""
    if not unreadable:
        return split
    first = unreadable[min(unreadable)]
    if on_error == "refuse":
        raise UserError(stopped_at(first, on_error))
    log.warning("%s; replaced by the next readable image of its split (%d unreadable in all)",
                first, len(unreadable))
    replaced = {}
    for s, idx in split.items():
        ids = idx.tolist()
        replaced[s] = torch.tensor([_next_readable(ids, p, unreadable) for p in range(len(ids))],
                                   dtype=torch.long)
    return replaced


def _next_readable(ids: list[int], position: int, unreadable: dict[int, str]) -> int:
    """The item a streamed split reads for ``position`` (stream.Items)."""
    for step in range(RETRIES):
        i = ids[(position + step) % len(ids)]
        if i not in unreadable:
            return i
    raise UserError(stopped_at(unreadable[ids[position]], "skip"))


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
    loading = streaming(workers, prefetch, on_error, augment)
    if stream:
        source, decoder = Files(files), Decoder(channels, image_size)
        return streamed_data("folder", source, split, decoder, loading, augment, y)
    images, unreadable = decoded(base, files, root, channels, image_size, cache, on_error)
    split = readable(split, unreadable, on_error)
    return ImageData(name="folder", **{s: images[idx] for s, idx in split.items()},
                     labels={} if y is None else {s: y[idx] for s, idx in split.items()})


def decoded(base: Path, files: list[Path], root: str, channels: int, image_size: int,
            cache: bool, on_error: str) -> tuple[torch.Tensor, dict[int, str]]:
    """Every image decoded, from the cache when the files are unchanged, and the failures
    of those that did not decode, by index."""
    stats = [(str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = {"v": CACHE_VERSION, "dir": str(base.resolve()), "files": stats, "c": channels,
           "size": image_size}
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    cache_path = Path(root).expanduser() / "folder" / f"folder_{digest}.pt"
    data = load_cache(cache_path) if cache else None
    if not _usable(data, (len(files), channels, image_size, image_size)):
        log.info("decoding %d images from %s", len(files), base)
        images, unreadable = _load(files, channels, image_size, on_error)
        data = {"images": images, "unreadable": unreadable}
        if cache:
            save_cache(cache_path, data, "the dataset cache", "continuing without it")
    return data["images"], dict(data.get("unreadable", {}))


def _usable(data: object, shape: tuple[int, ...]) -> bool:
    """Whether a cache file holds what decoded() writes for these files (a truncated or
    foreign one is rebuilt)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), torch.Tensor):
        return False
    failures = data.get("unreadable", {})
    return data["images"].dtype == torch.uint8 and tuple(data["images"].shape) == shape \
        and isinstance(failures, dict) and all(
            isinstance(i, int) and 0 <= i < shape[0] and isinstance(m, str)
            for i, m in failures.items())
