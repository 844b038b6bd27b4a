"""Streamed splits (dataset.stream=true): decoded by DataLoader workers batch by batch,
yet the same run as the in-memory path; augmentation a function of (seed, epoch, item);
unreadable files skipped and counted, or refused; a preempted streamed run resumes bit for
bit. Folders are written here, in the real formats (PNG and JPEG of several sizes)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
import torch
from hostile import Forked, in_process, once
from test_cli import rows
from test_reliability import _interrupt_mid_epoch

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
    # a streamed run is scored and sampled like any other (IWAE, pictures, Fréchet features)
    done = in_process("eval", f"ckpt={runs['true'] / 'checkpoints/best.pt'}",
                      "eval.iw_samples=4", "fd.samples=16", "fd.epochs=1", cwd=tmp_path)
    assert "nll_iwae" in done.stdout and "fd_folder_features" in done.stdout


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
    with pytest.raises(UserError, match=r"cannot decode image .*000\.png"):
        s[at]  # a single read (pictures, features) names it too


def test_a_streamed_run_preempted_mid_epoch_resumes_bit_for_bit(tmp_path):
    """SIGTERM in epoch 2 of a streamed run (augmented, two workers), then a resume: the
    metrics and weights of the uninterrupted run. The resume skips the consumed batches by
    index and draws the same crops for the rest."""
    photos = write_folder(tmp_path / "photos", n=640)
    args = [*FOLDER, f"dataset.path={photos}", "dataset.stream=true", "dataset.augment=true",
            "trainer.epochs=2", "trainer.log_every=1"]
    full = tmp_path / "full"
    Forked.run("train", *args, f"hydra.run.dir={full}", cwd=tmp_path)
    run = tmp_path / "cut"
    code, line = _interrupt_mid_epoch(["train", *args, f"hydra.run.dir={run}"], tmp_path,
                                      signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "ckpt=" in line, line
    Forked.run("train", f"ckpt={run / 'checkpoints/last.pt'}", cwd=tmp_path)
    assert rows(run) == rows(full)
    a, b = (torch.load(r / "checkpoints/last.pt", weights_only=True)["model"]
            for r in (full, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


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
