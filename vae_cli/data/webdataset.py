"""Image sets shipped as WebDataset shards (``dataset=webdataset``): tar files whose members
``<key>.<ext>`` group into samples, an image (jpg, jpeg, png, webp) and optionally a class
id (``cls``). Always streamed (see data.stream).

Each shard is read once, with the standard library's tarfile, to index where each sample's
image lies (its offset and size in the tar, the same random access webdataset's own
indexed reader, wids, gives); the index is cached under <root>/webdataset/, keyed by the
shards' names, sizes and modification times. Batches then read those bytes with one seek,
so an epoch's order, its split across data-parallel ranks, and a resume are those of any
streamed split. `vae shard` writes shards from a folder with webdataset's ShardWriter.
Local paths; brace patterns (``shards-{000000..000127}.tar``) as webdataset expands them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import tarfile
from pathlib import Path

import torch

from vae_cli.data.base import ImageData, check_images_settings, load_cache, three_way
from vae_cli.data.stream import Decoder, streamed_data, streaming
from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import save_cache

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1
# Far past any published set of shards; each is listed, checked and indexed before training,
# and a typo in a brace range (one digit too many) would otherwise fill the memory first.
MAX_SHARDS = 10**6
INT_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}")


class Shards:
    """Samples of tar shards as a streamed split's source: (shard, offset, size) each."""

    def __init__(self, files: list[str], index: dict[str, torch.Tensor], keys: list[str]):
        self.files, self.keys = files, keys
        self.where = index["where"].tolist()  # [n, 3]: shard, offset, size

    def __len__(self) -> int:
        return len(self.where)

    def read(self, i: int) -> bytes:
        shard, offset, size = self.where[i]
        with open(self.files[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.files[shard]} ends inside sample {self.keys[i]}")
        return data

    def name(self, i: int) -> str:
        return f"{self.files[self.where[i][0]]}:{self.keys[i]}"


def expand(urls: str) -> list[Path]:
    """A brace pattern as the shard files it names, each checked (several sets of shards:
    alternatives, ``{/a/s-{0..9}.tar,/b/s-{0..9}.tar}``)."""
    import braceexpand

    # braceexpand builds each range whole (a typo of one digit too many would fill the
    # memory) and their product lazily: both are bounded before anything is listed
    too_many = UserError(f"dataset.urls={urls} names more than {MAX_SHARDS:,} shards (each "
                         "is listed, checked and indexed before training); check its ranges")
    if any(abs(int(m[2]) - int(m[1])) >= MAX_SHARDS for m in INT_RANGE.finditer(str(urls))):
        raise too_many
    try:
        names = list(itertools.islice(braceexpand.braceexpand(str(urls)), MAX_SHARDS + 1))
    except braceexpand.UnbalancedBracesError:
        raise UserError(f"dataset.urls={urls}: its braces are unbalanced") from None
    if len(names) > MAX_SHARDS:
        raise too_many
    if not names:
        raise UserError("dataset.urls names no shards")
    remote = next((u for u in names if "://" in u or u.startswith("pipe:")), None)
    if remote:
        raise UserError(f"dataset.urls: {remote} is not a local file; dataset=webdataset "
                        "reads local shards (copy or mount them)")
    files = [Path(u).expanduser() for u in names]
    for f in files:
        if not f.is_file():
            raise UserError(f"dataset.urls: shard {f} does not exist")
    return files


def index_shard(path: Path, shard: int) -> tuple[list[list[int]], list[str], list[int | None]]:
    """Each sample's image (offset, size) and class id, in the tar's order."""
    where: dict[str, list[int]] = {}
    cls: dict[str, int] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                base, _, ext = m.name.rpartition("/")[2].partition(".")
                key = m.name.rpartition("/")[0] + "/" + base if "/" in m.name else base
                if not m.isfile() or not base:
                    continue
                if ext.lower() in IMAGE_EXTENSIONS and key not in where:
                    where[key] = [shard, m.offset_data, m.size]
                elif ext == "cls":
                    cls[key] = read_class(tar, m, path)
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"{path} is not a readable tar shard ({one_line(e)})") from None
    keys = list(where)
    return [where[k] for k in keys], keys, [cls.get(k) for k in keys]


def read_class(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    text = tar.extractfile(member).read(32).decode(errors="replace").strip()
    if not text.isdigit():
        raise UserError(f"{path}: {member.name} holds {text!r}, not a class id")
    return int(text)


def build_index(files: list[Path], root: str, cache: bool) -> tuple[dict, list[str]]:
    """The shards' sample index, from the cache when the shards are unchanged."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps([INDEX_VERSION, stats]).encode()).hexdigest()[:16]
    path = Path(root).expanduser() / "webdataset" / f"index_{digest}.pt"
    saved = load_cache(path) if cache else None
    if saved is not None and {"where", "keys"} <= set(saved):
        return saved, list(saved["keys"])
    log.info("indexing %d shards (once; cached in %s)", len(files), path.parent)
    where, keys, classes = [], [], []
    for i, f in enumerate(files):
        w, k, c = index_shard(f, i)
        where += w
        keys += k
        classes += c
    if not where:
        raise UserError(f"no samples with an image ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{len(files)} shards")
    index = {"where": torch.tensor(where, dtype=torch.long), "keys": keys}
    if all(c is not None for c in classes):
        index["cls"] = torch.tensor(classes, dtype=torch.long)
    if cache:
        save_cache(path, index, "the shard index", "continuing without it")
    return index, keys


def webdataset(
    urls: str | None = None,
    root: str = "data",
    channels: int = 3,
    image_size: int = 64,
    val_fraction: float = 0.01,
    test_fraction: float = 0.01,
    split_seed: int = 0,
    cache: bool = True,
    workers: int = 2,
    prefetch: int = 2,
    augment: bool = False,
    on_error: str = "skip",
) -> ImageData:
    if urls is None:
        raise UserError("dataset=webdataset needs its shards: dataset.urls="
                        "'/data/shards-{000000..000127}.tar'")
    check_images_settings(channels, image_size, val_fraction, test_fraction)
    loading = streaming(workers, prefetch, on_error, augment)
    files = expand(urls)
    index, keys = build_index(files, root, cache)
    source = Shards([str(f) for f in files], index, keys)
    split = three_way(len(source), val_fraction, test_fraction, split_seed,
                      f"the shards hold {len(source)} samples")
    return streamed_data("webdataset", source, split, Decoder(channels, image_size), loading,
                         augment, index.get("cls"))
