"""Streamed splits (dataset.stream=true): decoded by DataLoader workers batch by batch,
yet the same run as the in-memory path; augmentation a function of (seed, epoch, item);
unreadable files skipped and counted, or refused; a preempted streamed run resumes bit for
bit. Folders are written here, in the real formats (PNG and JPEG of several sizes)."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hostile import Forked, in_process, once, one_line_failure
from test_data import png_bytes
from test_reliability import interrupted, resumed_as

from vae_cli.data.folder import folder
from vae_cli.data.stream import Decoder, ImageStream, Loading
from vae_cli.errors import UserError


def write_folder(root: Path, n: int = 96, seed: int = 0) -> Path:
    """Two classes of blob pictures, PNG and JPEG, in portrait and landscape sizes."""
    from torchvision.io import write_jpeg, write_png

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        kind = root / ("a" if i % 2 else "b")
        kind.mkdir(parents=True, exist_ok=True)
        h, w = (12, 16) if i % 3 else (18, 12)
        img = (torch.rand(3, 3, 3, generator=g) * 255)[None]
        img = torch.nn.functional.interpolate(img, size=(h, w), mode="bilinear")[0]
        img = img.to(torch.uint8)
        if i % 4:
            write_png(img, str(kind / f"{i:03d}.png"))
        else:
            write_jpeg(img, str(kind / f"{i:03d}.jpg"), quality=95)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return once("photos", lambda: write_folder(tmp_path_factory.mktemp("photos")))


FOLDER = ["dataset=folder", "dataset.image_size=8", "model.hidden=[32]", "model.latent_dim=3",
          "trainer.batch_size=8", "trainer.num_images=8"]


def test_a_streamed_folder_trains_the_same_run_as_the_folder_in_memory(photos, tmp_path):
    """Same split, same order, same pixels, same random noise: metrics.csv byte for byte,
    and the same weights, with two workers decoding ahead."""
    runs = {}
    for stream in ("false", "true"):
        run = tmp_path / stream
        in_process("train", *FOLDER, f"dataset.path={photos}", f"dataset.stream={stream}",
                   f"dataset.root={tmp_path / 'cache'}", "trainer.epochs=2",
                   f"hydra.run.dir={run}", cwd=tmp_path)
        runs[stream] = run
    assert (runs["true"] / "metrics.csv").read_bytes() == \
        (runs["false"] / "metrics.csv").read_bytes()
    a, b = (torch.load(r / "checkpoints/last.pt", weights_only=True)["model"]
            for r in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a streamed run is scored like any other (IWAE, Fréchet features), read streamed or
    # held in memory (how the data is read may change; what it is may not)
    ckpt = f"ckpt={runs['true'] / 'checkpoints/best.pt'}"
    scores = []
    for name, how in (("streamed", "+dataset.workers=0"), ("held", "+dataset.stream=false")):
        out = tmp_path / name
        done = in_process("eval", ckpt, how, "eval.iw_samples=4", "fd.samples=16",
                          "fd.epochs=1", f"out_dir={out}", cwd=tmp_path)
        scores.append(json.loads((out / "eval.json").read_text()))
        assert "fd_folder_features" in done.stdout
    assert {k: v for k, v in scores[0].items() if k != "checkpoint"} == \
        {k: v for k, v in scores[1].items() if k != "checkpoint"}
    refused = in_process("eval", ckpt, "+dataset.image_size=16", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "dataset.image_size=16 differs" in refused.stderr


def stream(photos: Path, workers: int, augment: bool = True, on_error: str = "skip"
           ) -> ImageStream:
    data = folder(str(photos), image_size=8, stream=True, workers=workers,
                  augment=augment, on_error=on_error)
    return data.train


def test_augmented_batches_depend_on_seed_and_item_not_on_workers_or_batching(photos):
    plan = [[5, 1, 7], [0, 2]]
    one = torch.cat(list(stream(photos, 0).batches(plan, seed=11)))
    two = torch.cat(list(stream(photos, 2).batches([[5], [1, 7, 0], [2]], seed=11)))
    assert torch.equal(one, two)  # the same crops and flips, however batched and decoded
    other = torch.cat(list(stream(photos, 0).batches(plan, seed=12)))
    assert not torch.equal(one, other)  # another epoch, other crops or flips
    plain = stream(photos, 0, augment=False)
    centre = torch.cat(list(plain.batches(plan, seed=11)))  # augment=false ignores seeds
    assert torch.equal(centre, plain[[5, 1, 7, 0, 2]])


def test_an_augmented_item_is_a_square_crop_of_the_resized_image_maybe_flipped(photos):
    """The whole resized image, with every possible crop position and both flips seen
    over seeds: the augmentation covers what it claims, no more."""
    from torchvision.transforms.v2 import functional as F

    from vae_cli.data.folder import decode

    s = stream(photos, 0)
    i = next(p for p in range(len(s))  # an 18 x 12 one
             if int(Path(s.source.name(int(s.ids[p]))).stem) % 3 == 0)
    full = F.resize(decode(s.source.read(int(s.ids[i])), 3), [8], antialias=True)
    assert tuple(full.shape[1:]) == (12, 8)
    crops = [full[:, top:top + 8] for top in range(5)]
    seen = set()
    for seed in range(60):
        item = next(s.batches([[i]], seed=seed))[0]
        match = [(top, flip) for top, c in enumerate(crops) for flip in (0, 1)
                 if torch.equal(item, c.flip(-1) if flip else c)]
        assert match, f"seed {seed}: not a crop of the image"
        seen.update(match)
    assert seen == {(top, flip) for top in range(5) for flip in (0, 1)}


def test_unreadable_images_are_replaced_and_counted_or_refused_naming_the_file(
        photos, tmp_path, caplog):
    import shutil

    broken = tmp_path / "photos"
    shutil.copytree(photos, broken)
    (broken / "a" / "000.png").write_bytes(b"not a picture")  # sorted first in a/
    s = stream(broken, 2, augment=False)
    at = next(p for p in range(len(s)) if s.source.name(int(s.ids[p])).endswith("000.png"))
    with caplog.at_level(logging.WARNING):
        batch = next(s.batches([[at, 0]]))
    assert s.skipped == 1 and "000.png" in caplog.text and "1 so far" in caplog.text
    assert torch.equal(batch[0], s[(at + 1) % len(s)])  # the next readable item instead
    with pytest.raises(UserError, match=r"cannot decode image .*000\.png.*on_error=skip"):
        next(stream(broken, 2, on_error="refuse").batches([[at]]))
    # a read by index (pictures, features) replaces it too, or names it
    assert torch.equal(s[at], s[(at + 1) % len(s)]) and s.skipped == 2
    with pytest.raises(UserError, match=r"cannot decode image .*000\.png.*on_error=skip"):
        stream(broken, 0, on_error="refuse")[at]


def test_a_png_that_crashed_the_decoder_is_one_line_in_memory_streamed_and_sharded(tmp_path):
    """torchvision's PNG decoder died with SIGSEGV on a short image stream (and on most
    corrupt PNGs), past any handler. Each reading path runs as a process of its own (a
    crash fails the test, not pytest) and refuses the file in one line."""
    photos = write_folder(tmp_path / "photos", n=12)
    train = folder(str(photos), val_fraction=0.1, test_fraction=0.1, stream=True).train
    bad = next(Path(train.source.name(i)) for i in train.items.ids  # read in any epoch
               if train.source.name(i).endswith(".png"))
    # a 2000 x 2000 RGB header over a 100-byte stream: libpng's "Not enough image data"
    bad.write_bytes(png_bytes(2000, 2000, bytes(100), colour=2))
    shards = tmp_path / "shards"
    shards.mkdir()
    in_process("shard", str(photos), str(shards), cwd=tmp_path)
    urls = f'dataset.urls="{shards}/shards-000000.tar"'
    path = f"dataset.path={photos}"
    for name, how in (("held", [path]), ("streamed", [path, "dataset.stream=true"]),
                      ("sharded", ["dataset=webdataset", urls])):
        start = Forked(["train", *FOLDER, *how, *SPLIT,
                        "dataset.workers=0", "dataset.on_error=refuse", "trainer.epochs=1",
                        f"dataset.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / name}"],
                       cwd=tmp_path)
        _, err = start.communicate(timeout=300)
        key = str(bad.relative_to(photos).with_suffix(""))
        where = f"{shards}/shards-000000.tar:{key}" if name == "sharded" else str(bad)
        one_line_failure(SimpleNamespace(returncode=start.returncode, stderr=err),
                         f"cannot decode image {where}: its image stream ends after 100 of")


def test_a_streamed_run_preempted_mid_epoch_resumes_bit_for_bit(tmp_path):
    """SIGTERM in epoch 2 of a streamed run (augmented, two workers), then a resume: the
    metrics and weights of the uninterrupted run. The resume skips the consumed batches by
    index and draws the same crops for the rest."""
    photos = write_folder(tmp_path / "photos", n=640)
    args = [*FOLDER, f"dataset.path={photos}", "dataset.stream=true", "dataset.augment=true",
            "trainer.epochs=2", "trainer.log_every=1"]
    full = tmp_path / "full"
    Forked.run("train", *args, f"hydra.run.dir={full}", cwd=tmp_path)
    resumed_as(interrupted(["train", *args], tmp_path / "cut"), full)


@pytest.mark.parametrize(("key", "value", "why"), [
    ("workers", -1, "dataset.workers=-1 must be an integer >= 0"),
    ("prefetch", 0, "dataset.prefetch=0 must be an integer >= 1"),
    ("on_error", "ignore", "dataset.on_error='ignore' is not skip or refuse"),
])
def test_streaming_settings_are_checked_before_any_decoding(photos, key, value, why):
    with pytest.raises(UserError, match=why.replace("(", r"\(").replace(")", r"\)")):
        folder(str(photos), stream=True, **{key: value})


def test_loading_defaults_are_two_workers_and_skipping():
    assert Loading() == Loading(workers=2, prefetch=2, on_error="skip")
    assert Decoder(3, 8)  # hashable, frozen: pickled to the workers once


# -- WebDataset shards ----------------------------------------------------------------------
SPLIT = ["dataset.val_fraction=0.1", "dataset.test_fraction=0.1"]


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> str:
    """`vae shard` of the photos: 96 samples in 3 shards (the real command, in-process)."""
    def make():
        out = tmp_path_factory.mktemp("shards")
        done = in_process("shard", str(photos), str(out), "--per-shard", "40", cwd=out)
        assert "96 samples in 3 shards" in done.stdout
        return f"{out}/shards-{{000000..000002}}.tar"
    return once("shards", make)


def test_shards_the_tool_wrote_train_the_same_run_as_their_folder(photos, shards, tmp_path):
    """Same samples in the same order, same split: a run on the shards is the run on the
    folder they were written from, byte for byte, labels included."""
    from vae_cli.data.webdataset import webdataset

    runs = {}
    for name, data in (("folder", [f"dataset.path={photos}"]),
                       ("shards", ["dataset=webdataset", f'dataset.urls="{shards}"'])):
        runs[name] = tmp_path / name
        in_process("train", *FOLDER, *data, *SPLIT, f"dataset.root={tmp_path / 'cache'}",
                   "trainer.epochs=2", f"hydra.run.dir={runs[name]}", cwd=tmp_path)
    assert (runs["shards"] / "metrics.csv").read_bytes() == \
        (runs["folder"] / "metrics.csv").read_bytes()
    ours = webdataset(shards, root=str(tmp_path / "cache"), val_fraction=0.1,
                      test_fraction=0.1)
    theirs = folder(str(photos), root=str(tmp_path / "cache"))
    for s in ("train", "val", "test"):
        assert torch.equal(ours.labels[s], theirs.labels[s])


def test_a_shard_index_is_built_once_and_rebuilt_when_a_shard_changes(shards, tmp_path,
                                                                      caplog):
    import shutil

    from vae_cli.data.webdataset import webdataset

    copied = tmp_path / "shards"
    shutil.copytree(Path(shards).parent, copied)
    urls = f"{copied}/shards-{{000000..000002}}.tar"
    with caplog.at_level(logging.INFO):
        first = webdataset(urls, root=str(tmp_path))
        assert caplog.text.count("indexing 3 shards") == 1
        again = webdataset(urls, root=str(tmp_path))
        assert caplog.text.count("indexing 3 shards") == 1  # read from the cache
        assert again.train.source.where == first.train.source.where
        with (copied / "shards-000002.tar").open("ab") as f:
            f.write(b"\0" * 1024)  # a changed shard (longer) is indexed again
        webdataset(urls, root=str(tmp_path))
        assert caplog.text.count("indexing 3 shards") == 2


@pytest.mark.parametrize(("urls", "why"), [
    ("{dir}/shards-{{000000..000003}}.tar", "shard .*shards-000003.tar does not exist"),
    ("https://example.com/shards-{{0..1}}.tar", "is not a local file"),
    ("{dir}/broken.tar", "broken.tar is not a readable tar shard"),
])
def test_shards_that_cannot_be_read_are_one_line_naming_them(shards, tmp_path, urls, why):
    from vae_cli.data.webdataset import webdataset

    folder_of = Path(shards).parent
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 100)
    target = urls.format(dir=folder_of if "broken" not in urls else tmp_path)
    with pytest.raises(UserError, match=why):
        webdataset(target, root=str(tmp_path))


def test_vae_shard_leaves_existing_shards_alone(photos, shards, tmp_path):
    done = in_process("shard", str(photos), str(Path(shards).parent), cwd=tmp_path,
                      check=False)
    assert done.returncode == 2 and "already holds shards-*.tar" in done.stderr


def test_two_processes_on_shards_take_the_step_of_one(shards, tmp_path):
    """torchrun over the shards: each rank decodes its half of every global batch (its
    own workers), and the two together take one process's step."""
    from test_distributed import torchrun, weights

    args = [*FOLDER, "dataset=webdataset", f'dataset.urls="{shards}"', *SPLIT,
            "trainer.batch_size=16", "trainer.epochs=1", f"dataset.root={tmp_path}"]
    torchrun(*args, f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    in_process("train", *args, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def write_shard(path: Path, samples: dict[str, bytes]) -> str:
    """A tar shard of ``<key>.png`` members, as webdataset writes them."""
    import io

    with tarfile.open(path, "w") as tar:
        for key, data in samples.items():
            member = tarfile.TarInfo(f"{key}.png")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return str(path)


def test_a_sample_that_does_not_decode_is_skipped_when_read_by_index_too(photos, tmp_path,
                                                                        caplog):
    """Pictures and features read a split by index: on_error=skip replaces the sample there
    as in batches; refuse names the shard, the key and a cause (no Python object's repr)."""
    from vae_cli.data.webdataset import webdataset

    good = sorted(photos.rglob("*.png"))[:8]
    samples = {f"k{i:02d}": f.read_bytes() for i, f in enumerate(good)}
    urls = write_shard(tmp_path / "s.tar", {**samples, "k11": b"notpng"})
    kw = {"root": str(tmp_path), "val_fraction": 0.2, "test_fraction": 0.2, "workers": 0}
    data = webdataset(urls, **kw)
    split = next(s for s in ("train", "val", "test")
                 if any(data.split(s).source.name(i).endswith(":k11")
                        for i in data.split(s).items.ids))
    x = data.split(split)
    with caplog.at_level(logging.WARNING):
        images = x[:]
    assert len(images) == len(x) and "s.tar:k11" in caplog.text and x.skipped == 1
    with pytest.raises(UserError) as refused:
        webdataset(urls, **kw, on_error="refuse").split(split)[:]
    message = str(refused.value)
    assert "s.tar:k11: not a png, jpeg, bmp or webp image" in message, message
    assert "object at" not in message and "dataset.on_error=skip" in message


@pytest.mark.parametrize("urls", ["/x/shards-{000000..999999999}.tar",  # one range
                                  "/x/s-{0..999}{0..999}{0..9}.tar"])  # their product
def test_shard_names_past_a_million_are_refused_before_they_are_all_listed(tmp_path, urls):
    """Expanded, a billion names alone fill the memory (killed after minutes, no message)."""
    from vae_cli.data.webdataset import webdataset

    with pytest.raises(UserError, match=r"names more than 1,000,000 shards"):
        webdataset(urls, root=str(tmp_path))
    with pytest.raises(UserError, match=r"dataset\.urls=/x/s-\{0\.\.9\.tar: its braces"):
        webdataset("/x/s-{0..9.tar", root=str(tmp_path))
