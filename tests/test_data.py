"""Data layer: every dataset built from tiny files in its real on-disk format (offline)."""

from __future__ import annotations

import inspect
import logging
import math
import os
import pickle
import struct
import typing
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from omegaconf import OmegaConf
from PIL import Image
from torchvision.io import write_jpeg, write_png

from vae_cli.data import ImageData, binarize_once, check_images
from vae_cli.data import shapes as shapes_mod
from vae_cli.data.batching import to_unit
from vae_cli.data.celeba import celeba
from vae_cli.data.dsprites import FILENAME as DSPRITES_FILE
from vae_cli.data.dsprites import dsprites
from vae_cli.data.folder import folder
from vae_cli.data.shapes import render, shapes
from vae_cli.data.standard import binarized_mnist, cifar10, fashion_mnist, mnist
from vae_cli.data.text import text
from vae_cli.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "dataset"
SMALL = {"n_train": 300, "n_val": 60, "n_test": 60}
# write_png/write_jpeg build the test files; torchvision 0.29 deprecates them for TorchCodec.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


# ---------------------------------------------------------------- container and helpers

def test_yaml_keys_match_function_signatures():
    allowed = {int, float, bool, str, str | None, int | None, list[str]}
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"shapes", "mnist", "fashion_mnist", "binarized_mnist", "cifar10", "celeba",
            "folder", "dsprites"} <= set(names)
    for name in names:
        cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
        module, fn_name = cfg.pop("_target_").rsplit(".", 1)
        assert module.startswith("vae_cli.data.")
        fn = getattr(__import__(module, fromlist=[fn_name]), fn_name)
        params = {k: p for k, p in inspect.signature(fn).parameters.items()
                  if p.kind != p.KEYWORD_ONLY}  # keyword-only: runtime, not config
        assert set(params) == set(cfg), name
        hints = typing.get_type_hints(fn)
        for key, value in cfg.items():
            assert hints[key] in allowed, (name, key)
            assert params[key].default == value, (name, key)  # YAML and code agree


def test_image_data_api():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    d = ImageData("t", x, x[:2], x[:1], labels={"train": torch.arange(4)})
    assert d.shape == (1, 8, 8)
    assert d.labels["val"] is None and d.factors["test"] is None and d.factor_names == []
    assert d.split("val") is d.val
    with pytest.raises(UserError, match="unknown split"):
        d.split("validation")
    moved = d.to("cpu")
    assert torch.equal(moved.train, x) and torch.equal(moved.labels["train"], torch.arange(4))
    with pytest.raises(UserError, match="val images are"):
        ImageData("t", x, torch.zeros(2, 1, 9, 9, dtype=torch.uint8), x)
    with pytest.raises(UserError, match="labels"):
        ImageData("t", x, x, x, labels={"train": torch.arange(3)})


def test_check_images_rejects_bad_tensors():
    with pytest.raises(UserError, match="empty"):
        check_images(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), "x")
    with pytest.raises(UserError, match=r"\[N, C, H, W\]"):
        check_images(torch.zeros(3, 4, 4, dtype=torch.uint8), "x")
    with pytest.raises(UserError, match="uint8"):
        check_images(torch.zeros(3, 1, 4, 4), "x")


def test_binarize_once_and_to_unit():
    x = torch.full((200, 1, 10, 10), 128, dtype=torch.uint8)
    a = binarize_once(x, torch.Generator().manual_seed(3))
    b = binarize_once(x, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and set(a.unique().tolist()) == {0, 255}
    assert torch.equal(a, b)
    assert abs(to_unit(a).mean().item() - 128 / 255) < 0.01
    assert torch.equal(binarize_once(torch.tensor([0, 255], dtype=torch.uint8),
                                     torch.Generator()), torch.tensor([0, 255]).byte())


# ---------------------------------------------------------------- shapes

def test_shapes_tensors_and_factors(tmp_path):
    d = shapes(root=str(tmp_path), cache=False, **SMALL)
    assert d.name == "shapes" and d.shape == (1, 32, 32) and not d.binarize
    for s, n in (("train", 300), ("val", 60), ("test", 60)):
        x, f = d.split(s), d.factors[s]
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.uint8
        assert set(x.unique().tolist()) == {0, 255}
        assert (x.flatten(1).amax(1) == 255).all()  # no image is blank
        assert f.shape == (n, 5) and f.dtype == torch.float32
        assert torch.equal(d.labels[s], f[:, 0].long()) and d.labels[s].dtype == torch.long
    f = torch.cat(list(d.factors.values()))
    assert d.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    assert set(f[:, 0].tolist()) == {0.0, 1.0, 2.0}
    assert set(f[:, 1].tolist()) <= set(torch.linspace(0.5, 1, 6).tolist())
    assert f[:, 2].min() >= 0 and f[:, 2].max() < 2 * math.pi
    assert f[:, 3:].min() >= 0 and f[:, 3:].max() <= 1
    assert len(f[:, 2].unique()) > 30 and len(f[:, 3].unique()) > 25  # full grids are used


def test_shapes_deterministic(tmp_path):
    a = shapes(root=str(tmp_path), cache=False, **SMALL)
    b = shapes(root=str(tmp_path), cache=False, **SMALL)
    c = shapes(root=str(tmp_path), cache=False, seed=1, **SMALL)
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s), b.split(s))
        assert torch.equal(a.factors[s], b.factors[s])
    assert not torch.equal(a.train, c.train)


def test_shapes_cache_written_and_reused(tmp_path, monkeypatch):
    a = shapes(root=str(tmp_path), **SMALL)
    files = list((tmp_path / "shapes").glob("shapes_*.pt"))
    assert len(files) == 1 and not list((tmp_path / "shapes").glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("rendered again instead of using the cache")

    monkeypatch.setattr(shapes_mod, "render", fail)
    b = shapes(root=str(tmp_path), **SMALL)
    assert torch.equal(a.train, b.train) and torch.equal(a.factors["test"], b.factors["test"])
    with pytest.raises(AssertionError):  # other arguments -> another cache file
        shapes(root=str(tmp_path), seed=5, **SMALL)
    files[0].write_bytes(b"truncated")  # a corrupt cache is rebuilt, not trusted
    monkeypatch.undo()
    c = shapes(root=str(tmp_path), **SMALL)
    assert torch.equal(a.train, c.train)


def test_shapes_unwritable_root_skips_cache(tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    d = shapes(root=str(blocker), **SMALL)
    assert len(d.train) == 300
    assert "could not save the dataset cache" in caplog.text


def test_shapes_classes_differ():
    # Same scale, orientation and position: only the shape differs.
    f = torch.tensor([[k, 1.0, 0.0, 0.5, 0.5] for k in range(3)], dtype=torch.float64)
    x = render(f, 32).float() / 255
    areas = x.sum((1, 2, 3))
    assert (areas > 40).all()
    for i in range(3):
        for j in range(i + 1, 3):
            assert (x[i] != x[j]).sum() > 15, (i, j)
    # Rotation is visible for every shape (the square only off its 90-degree symmetry).
    g = f.clone()
    g[:, 2] = math.pi / 8
    assert ((render(g, 32) != render(f, 32)).flatten(1).sum(1) > 10).all()
    d = shapes(cache=False, n_train=600, n_val=10, n_test=10)
    means = [d.train[d.labels["train"] == k].float().mean(0) for k in range(3)]
    counts = [m.sum() for m in means]
    assert len({round(c.item()) for c in counts}) == 3  # mean areas differ between classes


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_inside_frame(size):
    # Largest scale at the four extreme positions, every orientation: never clipped.
    rows = [[k, 1.0, o * 2 * math.pi / 40, px, py]
            for k in range(3) for o in range(40) for px in (0, 1) for py in (0, 1)]
    x = render(torch.tensor(rows, dtype=torch.float64), size)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
    assert border.max() == 0
    assert (x.flatten(1).amax(1) == 255).all()
    # And the same sprite at the centre has the same area (nothing was cut off).
    centre = torch.tensor([r[:3] + [0.5, 0.5] for r in rows], dtype=torch.float64)
    a, b = x.flatten(1).float().sum(1), render(centre, size).flatten(1).float().sum(1)
    assert ((a - b).abs() <= 0.1 * b + 2 * 255).all()


def test_shapes_size_64(tmp_path):
    d = shapes(root=str(tmp_path), image_size=64, n_train=40, n_val=8, n_test=8)
    assert d.shape == (1, 64, 64) and set(d.test.unique().tolist()) == {0, 255}


def test_shapes_bad_arguments():
    with pytest.raises(UserError, match="n_val"):
        shapes(cache=False, n_train=10, n_val=0, n_test=5)
    with pytest.raises(UserError, match="image_size"):
        shapes(cache=False, image_size=8, **SMALL)


# ---------------------------------------------------------------- MNIST family (IDX files)

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as torchvision reads it: big-endian magic 0x08 (ubyte) << 8 | ndim, then dims."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", (0x08 << 8) | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)  # an id per image to follow it through the split
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", x)
        write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", y)
        data[split] = (x, y)
    assert struct.unpack(">I", (root / folder / "raw/train-images-idx3-ubyte")
                         .read_bytes()[:4])[0] == 2051
    return data


def test_mnist_round_trip_and_split(tmp_path):
    raw = make_mnist(tmp_path)
    d = mnist(root=str(tmp_path), download=False, val_size=10, split_seed=0)
    assert d.shape == (1, 28, 28) and not d.binarize
    assert (len(d.train), len(d.val), len(d.test)) == (50, 10, 20)
    x, y = (torch.from_numpy(a) for a in raw["train"])
    ids_t, ids_v = d.train[:, 0, 0, 0].long(), d.val[:, 0, 0, 0].long()
    assert set(ids_t.tolist()).isdisjoint(ids_v.tolist())
    assert sorted(ids_t.tolist() + ids_v.tolist()) == list(range(60))
    for xs, ys, ids in ((d.train, d.labels["train"], ids_t), (d.val, d.labels["val"], ids_v)):
        assert torch.equal(xs[:, 0], x[ids]) and torch.equal(ys, y[ids].long())
    assert torch.equal(d.test[:, 0], torch.from_numpy(raw["t10k"][0]))
    assert torch.equal(d.labels["test"], torch.from_numpy(raw["t10k"][1]).long())
    other = mnist(root=str(tmp_path), download=False, val_size=10, split_seed=1)
    assert not torch.equal(other.val, d.val)


def test_binarized_mnist_fixed_eval_binarization(tmp_path):
    make_mnist(tmp_path)
    a = binarized_mnist(root=str(tmp_path), download=False, val_size=10, split_seed=0)
    b = binarized_mnist(root=str(tmp_path), download=False, val_size=10, split_seed=0)
    assert a.binarize and a.name == "binarized_mnist"
    for s in ("val", "test"):
        assert set(a.split(s).unique().tolist()) == {0, 255}
        assert torch.equal(a.split(s), b.split(s))
    assert len(a.train.unique()) > 2  # train stays grey: the trainer resamples it per batch
    c = binarized_mnist(root=str(tmp_path), download=False, val_size=10, split_seed=2)
    assert not torch.equal(a.test, c.test)


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    raw = make_mnist(tmp_path, folder="FashionMNIST", n_train=30, n_test=7)
    d = fashion_mnist(root=str(tmp_path), download=False, val_size=5, split_seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (25, 5, 7)
    assert torch.equal(d.test[:, 0], torch.from_numpy(raw["t10k"][0]))
    with pytest.raises(UserError, match="MNIST/raw/train-images-idx3-ubyte"):
        mnist(root=str(tmp_path), download=False, val_size=5)


def test_missing_files_without_download(tmp_path):
    expected = {mnist: "MNIST/raw/train-images-idx3-ubyte",
                fashion_mnist: "FashionMNIST/raw/train-images-idx3-ubyte",
                cifar10: "cifar-10-batches-py/data_batch_1"}
    for fn, rel in expected.items():
        with pytest.raises(UserError) as e:
            fn(root=str(tmp_path), download=False, val_size=5, split_seed=0)
        msg = str(e.value)
        assert str(tmp_path / rel) in msg and "dataset.root" in msg and "\n" not in msg
    with pytest.raises(UserError, match="dataset.root") as e:
        celeba(root=str(tmp_path), download=False, image_size=16)
    assert str(tmp_path / "celeba" / "img_align_celeba") in str(e.value)


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirror, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(UserError) as e:
        mnist(root=str(tmp_path), download=True, val_size=5)
    msg = str(e.value)
    assert "\n" not in msg and "name resolution" in msg and "dataset.root" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg

    def cifar_offline(self):
        raise URLError("no network")

    monkeypatch.setattr(tvd.CIFAR10, "download", cifar_offline)
    with pytest.raises(UserError, match="no network.*dataset.root"):
        cifar10(root=str(tmp_path), download=True, val_size=5)


def test_corrupt_idx_file_is_a_user_error(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
    with pytest.raises(UserError, match="could not read"):
        mnist(root=str(tmp_path), download=False, val_size=5)


def test_val_size_must_leave_training_data(tmp_path):
    make_mnist(tmp_path)
    with pytest.raises(UserError, match="val_size"):
        mnist(root=str(tmp_path), download=False, val_size=60)
    with pytest.raises(UserError, match="val_size"):
        mnist(root=str(tmp_path), download=False, val_size=0)


# ---------------------------------------------------------------- CIFAR-10 (pickled batches)

def test_cifar10_from_fake_batches(tmp_path, monkeypatch):
    # torchvision checks each file's official md5, which no fake can match: the test disables
    # only that check (md5=None means "exists"), and exercises the real loading code.
    cls = tvd.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f, None] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, None] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    folder_ = tmp_path / cls.base_folder
    folder_.mkdir()
    rng = np.random.default_rng(0)
    planes = {}
    for name, _ in cls.train_list + cls.test_list:
        x = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)  # R, G, B planes per row
        planes[name] = x
        entry = {"data": x.reshape(4, 3072), "labels": rng.integers(0, 10, 4).tolist()}
        (folder_ / name).write_bytes(pickle.dumps(entry))
    (folder_ / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    d = cifar10(root=str(tmp_path), download=False, val_size=5, split_seed=0)
    assert d.shape == (3, 32, 32) and (len(d.train), len(d.val), len(d.test)) == (15, 5, 4)
    assert d.test.is_contiguous() and torch.equal(d.test, torch.from_numpy(planes["test_batch"]))
    all_train = torch.from_numpy(np.concatenate([planes[f"data_batch_{i}"] for i in range(1, 6)]))
    got = torch.cat([d.train, d.val])
    assert sorted(map(bytes, got.flatten(1).numpy())) == sorted(
        map(bytes, all_train.flatten(1).numpy()))


# ---------------------------------------------------------------- CelebA

def test_celeba_from_fake_files(tmp_path, monkeypatch):
    cls = tvd.CelebA
    monkeypatch.setattr(cls, "file_list", [(i, None, f) for i, _, f in cls.file_list])
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    # torchvision's CelebA fails on a split of exactly one image (a 0-d squeeze): use two.
    names = [f"{i:06d}.jpg" for i in range(1, 8)]
    part = [0, 0, 0, 1, 1, 2, 2]
    for i, n in enumerate(names):
        img = torch.full((3, 218, 178), 20 * i, dtype=torch.uint8)
        img[:, 100:120, 80:100] = 255  # a bright centre survives the 140 crop
        write_jpeg(img, str(base / "img_align_celeba" / n), quality=95)
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, part, strict=True)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} 1\n" for n in names))
    (base / "list_bbox_celeba.txt").write_text(
        "7\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 1 2 3 4\n" for n in names))
    (base / "list_landmarks_align_celeba.txt").write_text(
        "7\nlefteye_x lefteye_y\n" + "".join(f"{n} 1 2\n" for n in names))
    (base / "list_attr_celeba.txt").write_text(
        "7\nSmiling Young \n" + "".join(f"{n}  1 -1\n" for n in names))
    d = celeba(root=str(tmp_path), download=False, image_size=16)
    assert d.shape == (3, 16, 16) and (len(d.train), len(d.val), len(d.test)) == (3, 2, 2)
    assert d.factor_names == ["Smiling", "Young"]
    assert torch.equal(d.factors["val"], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert d.train[:, :, 8, 8].min() > 200  # centre pixel, after crop and resize
    assert (base / "celeba_16.pt").is_file()
    for p in (base / "img_align_celeba").iterdir():
        p.unlink()  # the cache alone is enough from now on
    again = celeba(root=str(tmp_path), download=False, image_size=16)
    assert torch.equal(again.test, d.test) and again.factor_names == d.factor_names


# ---------------------------------------------------------------- folder of images

def make_folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    write_png(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8, generator=g),
              str(root / "a.png"))
    write_png(torch.randint(0, 256, (1, 40, 25), dtype=torch.uint8, generator=g),
              str(root / "sub" / "b.png"))
    write_jpeg(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
               str(root / "sub" / "deeper" / "c.JPG"))
    Image.new("RGBA", (17, 23), (255, 0, 0, 128)).save(root / "d.png")
    Image.new("RGB", (33, 21), (0, 0, 255)).save(root / "sub" / "e.bmp")
    Image.new("RGB", (30, 30), (0, 255, 0)).save(root / "f.webp")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_loads_mixed_images(tmp_path, channels):
    path = make_folder(tmp_path / "imgs")
    d = folder(path=str(path), root=str(tmp_path / "cache"), channels=channels, image_size=16,
               val_fraction=0.2, test_fraction=0.2, split_seed=0)
    assert d.shape == (channels, 16, 16)
    assert (len(d.train), len(d.val), len(d.test)) == (4, 1, 1)
    assert d.labels["train"] is None and d.factors["train"] is None


def test_folder_cache_and_invalidation(tmp_path, monkeypatch):
    import vae_cli.data.folder as folder_mod

    path = make_folder(tmp_path / "imgs")
    kw = {"path": str(path), "root": str(tmp_path / "cache"), "image_size": 8}
    a = folder(**kw)
    assert len(list((tmp_path / "cache" / "folder").glob("folder_*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(folder_mod, "_load", fail)
    b = folder(**kw)
    assert torch.equal(a.train, b.train)
    cached, = (tmp_path / "cache" / "folder").glob("folder_*.pt")
    images = torch.load(cached, weights_only=True)["images"]
    for foreign in ({"images": images[:1]}, {"images": images, "unreadable": {10**6: "x"}},
                    {"images": "x"}, ["images"]):  # a cache file is read as possibly hostile
        torch.save(foreign, cached)
        with pytest.raises(AssertionError):  # rebuilt, not trusted
            folder(**kw)
    os.utime(path / "a.png", ns=(1, 1))  # a changed file means a new cache key
    with pytest.raises(AssertionError):
        folder(**kw)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="dataset.path=<dir>"):
        folder(path=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        folder(path=str(empty), cache=False)
    with pytest.raises(UserError, match="not a directory"):
        folder(path=str(tmp_path / "missing"), cache=False)
    path = make_folder(tmp_path / "imgs")
    (path / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="broken.png.*dataset.on_error=skip replaces") as e:
        folder(path=str(path), cache=False, on_error="refuse")
    assert str(path / "sub" / "broken.png") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="channels"):
        folder(path=str(path), channels=2, cache=False)
    with pytest.raises(UserError, match="val_fraction"):
        folder(path=str(path), val_fraction=1.5, cache=False)


def test_an_image_that_does_not_decode_is_replaced_in_memory_as_when_streamed(tmp_path,
                                                                             caplog):
    """on_error=skip (the default) holds for a folder in memory too: the next readable
    image of the split instead, warned with its path, the same pixels as streamed."""
    path = make_folder(tmp_path / "imgs")
    (path / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    kw = {"path": str(path), "root": str(tmp_path / "cache"), "image_size": 8,
          "val_fraction": 0.2, "test_fraction": 0.2}
    for attempt in ("decoded", "from the cache"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            held = folder(**kw)
        assert "broken.png" in caplog.text and "1 unreadable" in caplog.text, attempt
    streamed = folder(**kw, stream=True, workers=0)
    for s in ("train", "val", "test"):
        assert torch.equal(held.split(s), streamed.split(s)[:]), s
    with pytest.raises(UserError, match=r"broken\.png: .*; dataset\.on_error=skip replaces"):
        folder(**kw, on_error="refuse")  # the cache remembers what did not decode


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit grey PNG (Pillow's mode I;16)."""
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def test_16_bit_pngs_keep_their_most_significant_byte(tmp_path):
    """16-bit grey gradients beside an 8-bit colour image decode to v >> 8 (not the low
    byte, not clipped at 255), held in memory and streamed, where a batch once mixed uint16
    with uint8 and failed."""
    root = tmp_path / "imgs"
    root.mkdir()
    v = np.arange(256).reshape(16, 16)
    expected = []
    for i in range(4):  # high byte v (shifted), low byte 255 - v: wrapping gives the latter
        write_png16(root / f"g{i}.png", ((v + 16 * i) % 256) * 256 + (255 - v))
        expected.append(torch.from_numpy(((v + 16 * i) % 256).astype(np.uint8)).expand(3, -1, -1))
    colour = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    write_png(colour, str(root / "rgb.png"))
    expected.append(colour)
    kw = {"path": str(root), "image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2,
          "cache": False, "workers": 0}
    held, streamed = folder(**kw), folder(**kw, stream=True)
    batch = torch.cat(list(streamed.train.batches([list(range(len(streamed.train)))])))
    images = [*held.train, *held.val, *held.test, *batch]
    assert batch.dtype == torch.uint8 and len(images) == 8
    for x in images:
        assert any(torch.equal(x, e) for e in expected)


def test_an_empty_val_file_is_named_not_the_training_file(tmp_path):
    corpus = tmp_path / "good.txt"
    corpus.write_text("".join(f"line {i} of words\n" for i in range(20)))
    empty = tmp_path / "empty_val.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match=r"empty_val\.txt holds no lines.*dataset\.val_path"):
        text(str(corpus), val_path=str(empty))


# ---------------------------------------------------------------- dSprites file

def make_dsprites(path: Path, n: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    classes = np.stack([np.zeros(n), rng.integers(0, 3, n), rng.integers(0, 6, n),
                        rng.integers(0, 40, n), rng.integers(0, 32, n),
                        rng.integers(0, 32, n)], 1).astype(np.int64)
    values = np.stack([np.ones(n), classes[:, 1] + 1.0, 0.5 + classes[:, 2] / 10,
                       classes[:, 3] * 2 * np.pi / 39, classes[:, 4] / 31, classes[:, 5] / 31], 1)
    imgs = rng.integers(0, 2, (n, 64, 64), dtype=np.uint8)
    imgs[:, 0, :6] = (np.arange(n)[:, None] >> np.arange(6)) & 1  # an id per image, in bits
    path.parent.mkdir(parents=True, exist_ok=True)
    # The real file also holds a pickled `metadata` dict, which must never be unpickled.
    np.savez_compressed(path, imgs=imgs, latents_values=values, latents_classes=classes,
                        metadata=np.array({"date": "x"}, dtype=object))
    return {"imgs": imgs, "values": values, "classes": classes}


def test_dsprites_from_tiny_npz(tmp_path):
    raw = make_dsprites(tmp_path / DSPRITES_FILE)
    d = dsprites(root=str(tmp_path), val_size=5, test_size=5, split_seed=0)
    assert d.shape == (1, 64, 64) and (len(d.train), len(d.val), len(d.test)) == (40, 5, 5)
    assert d.factor_names == ["shape", "scale", "orientation", "posX", "posY"]
    def ids(x):
        return ((x[:, 0, 0, :6].long() // 255) << torch.arange(6)).sum(1)

    assert sorted(torch.cat([ids(d.split(s)) for s in ("train", "val", "test")]).tolist()) == \
        list(range(50))
    for s in ("train", "val", "test"):
        x, i = d.split(s), ids(d.split(s))
        assert set(x.unique().tolist()) == {0, 255}
        assert torch.equal(x[:, 0], torch.from_numpy(raw["imgs"])[i] * 255)
        assert torch.equal(d.labels[s], torch.from_numpy(raw["classes"][:, 1])[i])
        f = torch.from_numpy(raw["values"][:, 1:].astype(np.float32))[i]
        assert torch.equal(d.factors[s][:, 1:], f[:, 1:])
        assert torch.equal(d.factors[s][:, 0], d.labels[s].float())


def test_dsprites_subset_and_subfolder(tmp_path):
    make_dsprites(tmp_path / "dsprites" / DSPRITES_FILE)
    d = dsprites(root=str(tmp_path), subset=30, val_size=4, test_size=6, split_seed=1)
    assert (len(d.train), len(d.val), len(d.test)) == (20, 4, 6)
    with pytest.raises(UserError, match="subset"):
        dsprites(root=str(tmp_path), subset=51, val_size=4, test_size=6)
    with pytest.raises(UserError, match="no training images"):
        dsprites(root=str(tmp_path), subset=10, val_size=4, test_size=6)


def test_dsprites_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        dsprites(root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / DSPRITES_FILE) in msg and "dataset.root" in msg
    assert "dSprites repository" in msg


def test_dsprites_wrong_or_corrupt_file(tmp_path):
    np.savez(tmp_path / DSPRITES_FILE, imgs=np.zeros((4, 64, 64), np.uint8),
             latents_values=np.zeros((4, 5)), latents_classes=np.zeros((4, 6), np.int64))
    with pytest.raises(UserError, match="not the dSprites file"):
        dsprites(root=str(tmp_path), val_size=1, test_size=1)
    (tmp_path / DSPRITES_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="cannot read dSprites file"):
        dsprites(root=str(tmp_path), val_size=1, test_size=1)


def png_bytes(w: int, h: int, raw: bytes, colour: int = 0, interlaced: int = 0) -> bytes:
    """A PNG of 8-bit samples whose image stream is ``raw`` (filter bytes included)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, interlaced)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) \
        + chunk(b"IEND", b"")


@pytest.mark.parametrize("interlaced", [0, 1])
def test_a_png_whose_stream_ends_early_is_refused_not_filled_with_black(interlaced):
    # Pillow decodes the rows it finds and leaves the rest black, without a word
    from vae_cli.data.images import ADAM7, decode

    w, h = 11, 6
    pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    rows = [b"\0" + bytes(row.flatten().tolist()) for x0, y0, dx, dy in passes
            for row in pixels[y0::dy, x0::dx] if row.numel()]
    whole = decode(png_bytes(w, h, b"".join(rows), colour=2, interlaced=interlaced), 3)
    assert torch.equal(whole, pixels.permute(2, 0, 1))  # every row counted, Adam7's too
    with pytest.raises(ValueError, match="truncated PNG"):
        decode(png_bytes(w, h, b"".join(rows[:-1]), colour=2, interlaced=interlaced), 3)
