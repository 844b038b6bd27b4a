"""Reliability class 6: every value a user can type is checked before any work, with one
line naming the key; files that would blow up late are refused early; odd but valid data
(a one-image validation split) trains end to end."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hostile import digest, in_process, one_line_failure, unchanged
from omegaconf.errors import OmegaConfBaseException
from test_cli import TINY, vae
from torchvision.io import write_png

from vae_cli.commands.main import one_line
from vae_cli.config.schemas import validate_eval, validate_sample, validate_train
from vae_cli.errors import UserError


@pytest.fixture
def run(finished_run):
    return finished_run  # only read: a refused reader leaves it as it was (checked)


def _bomb(path) -> None:
    """A PNG whose header claims 40000 x 40000 pixels: a few bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


TRAIN = [
    (["optim.lr=inf"], "optim.lr"),
    (["divergence.beta=nan"], "divergence.beta"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim.eps=0"], "optim.eps=0 must be a number > 0"),  # else NaN at step 2
    (["seed=18446744073709551616"], "seed"),
    (["dataset.root=${oc.env:VAE_TEST_UNSET_VARIABLE}"], "VAE_TEST_UNSET_VARIABLE"),
    (["model.hidden=[64,nan]"], "model.hidden"),
]
READERS = [
    ("eval", ["eval.max_examples=-1"], "eval.max_examples"),
    ("eval", ["eval.iw_samples=1.5"], "eval.iw_samples"),
    ("sample", ["temperature=nan"], "temperature"),
    ("sample", ["temperature=inf"], "temperature"),
    ("sample", ["split=holdout"], "split"),
    ("sample", ["seed=-1"], "seed"),
    ("eval", ["out_dir=OUT/sub"], "out_dir"),
    ("sample", ["out_dir=OUT"], "out_dir"),
]


@pytest.mark.parametrize("args, fragment", TRAIN)
def test_train_values_are_refused_with_the_key_named(compose_cfg, args, fragment):
    with pytest.raises((UserError, OmegaConfBaseException)) as e:
        validate_train(compose_cfg([*TINY, *args]))
    assert fragment in one_line(e.value)


@pytest.mark.parametrize("command, args, fragment", READERS)
def test_eval_and_sample_values_are_refused_with_the_key_named(compose_cfg, tmp_path,
                                                               command, args, fragment):
    (tmp_path / "OUT").write_text("a file, not a folder")
    args = [a.replace("OUT", str(tmp_path / "OUT")) for a in args]
    validate = validate_eval if command == "eval" else validate_sample
    with pytest.raises(UserError, match=fragment):
        validate(compose_cfg(["ckpt=x.pt", *args], name=command))


@pytest.mark.parametrize("args, fragment", [TRAIN[0], TRAIN[4]])
def test_train_values_through_the_command(tmp_path, args, fragment):
    # the first as a process of its own (exit code and stderr end to end), the other
    # through the same dispatcher in this process
    start = vae if args == TRAIN[0][0] else in_process
    proc = start("train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                 check=False)
    one_line_failure(proc, fragment)
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.parametrize("command, args, fragment", [READERS[0], READERS[4], READERS[7]])
def test_eval_and_sample_values_are_checked_before_any_file(run, tmp_path, command, args,
                                                            fragment):
    (tmp_path / "OUT").write_text("a file, not a folder")
    before = digest(run)
    args = [a.replace("OUT", str(tmp_path / "OUT")) for a in args]
    start = vae if args == READERS[0][1] else in_process  # one end to end, as above
    proc = start(command, f"ckpt={run / 'checkpoints/last.pt'}", *args, cwd=tmp_path,
                 check=False)
    one_line_failure(proc, fragment)
    assert unchanged(before, run) and set(digest(run)) == set(before)


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(imgs / f"ok{i}.png"))
    _bomb(imgs / "bomb.png")
    proc = in_process("train", "dataset=folder", f"dataset.path={imgs}",
                      "dataset.image_size=16", "dataset.cache=false",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    one_line_failure(proc, "bomb.png")
    assert "40000x40000" in proc.stderr


def test_a_one_image_validation_split_trains_end_to_end(tmp_path):
    in_process("train", *TINY, "dataset.n_val=1", f"dataset.root={tmp_path / 'data'}",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert (tmp_path / "run/reconstructions.png").is_file()
    assert (tmp_path / "run/curves.png").is_file()
