"""Reliability class 3: what is on disk is always consistent. SIGKILLs at any moment, then
a resume, give the metrics.csv, best.pt and weights of an uninterrupted run, bit for bit;
a full disk keeps the previous checkpoint; a resume that would misread a saved position is
refused; a text run keeps its own vocabulary."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hostile import Forked, copy_run, in_process, one_line_failure
from test_cli import TINY
from test_reliability import LONG, _interrupt_mid_epoch
from test_text import TINY_RNN, write_corpus

from vae_cli.runtime import checkpoint

# six short epochs (32 steps) and pictures every other epoch
KILLS = [*TINY, "dataset.n_train=1024", "trainer.epochs=6", "trainer.image_every=2"]


def _identical(x, y, where: str = "") -> None:
    """Same structure, same types, tensors equal bit for bit (the pickled bytes may differ
    only in how equal strings were shared)."""
    assert type(x) is type(y), where
    if isinstance(x, dict):
        assert list(x) == list(y), where
        for k in x:
            _identical(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list | tuple):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _identical(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert x.dtype == y.dtype and torch.equal(x, y), where
    else:
        assert x == y or (x != x and y != y), where  # nan == nan here


def _same_run(a, b) -> None:
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    for name in ("best.pt", "last.pt"):
        _identical(checkpoint.load(a / "checkpoints" / name),
                   checkpoint.load(b / "checkpoints" / name), name)


def _count(path, text: str) -> int:
    return path.read_text().count(text) if path.exists() else 0


def _timeline(log: Path) -> tuple[list[float], float]:
    """Seconds from a start's set-up (its "parameters" line) to each epoch's line (the epoch
    saved), and to its last line (pictures written, the run done)."""
    def seconds(line: str) -> float:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    lines = [x for x in log.read_text().splitlines() if x.startswith("[")]
    (setup,) = [seconds(x) for x in lines if "parameters" in x]
    epochs = [seconds(x) - setup for x in lines if re.search(r"- epoch \d+/", x)]
    return [0.0, *epochs], seconds(lines[-1]) - setup


def streamed(tmp_path: Path) -> list[str]:
    """KILLS' schedule on a streamed folder: 64 steps an epoch, augmented, two workers."""
    from test_streaming import FOLDER, write_folder

    photos = write_folder(tmp_path / "photos", n=640)
    return [*FOLDER, f"dataset.path={photos}", "dataset.stream=true", "dataset.augment=true",
            "trainer.epochs=6", "trainer.image_every=2"]


@pytest.mark.parametrize("source", ["in memory", "streamed"])
def test_sigkills_at_random_moments_then_resume_match_an_uninterrupted_run(tmp_path, source):
    """Twelve moments drawn over the whole uninterrupted run (training, validation, saves,
    pictures, the end alike), in order: each start is killed at the next one, counted in
    the run's own time from what it resumed. A start that finishes first completes its
    run (compared too), and the moments left go to a fresh one. Every start is a process of
    its own (killed by the kernel, its files as it left them), forked with the imports
    done: kills land after set-up as before, 4 s sooner each. Streamed data too: its
    DataLoader workers die with their process, and a resume decodes the same crops."""
    settings = [*KILLS, f"dataset.root={tmp_path / 'data'}"] if source == "in memory" \
        else streamed(tmp_path)
    full = tmp_path / "full"
    Forked.run("train", *settings, f"hydra.run.dir={full}", cwd=tmp_path)
    saved_at, end = _timeline(full / "train.log")
    rng = random.Random(0)
    moments = sorted(rng.uniform(0.0, end) for _ in range(12))
    kills = runs = 0
    while moments:
        runs += 1
        run = tmp_path / f"cut{runs}"
        args = ["train", *settings, f"hydra.run.dir={run}", "trainer.resume=auto"]
        while moments:
            last = run / "checkpoints/last.pt"  # read back after every kill: never torn
            epoch = checkpoint.load(last)["state"]["epoch"] if last.exists() else 0
            starts = _count(run / "train.log", "parameters")
            proc = Forked(args, tmp_path)
            while _count(run / "train.log", "parameters") == starts and proc.poll() is None:
                time.sleep(0.02)  # this start is set up: the kill lands in its run
            time.sleep(max(0.0, moments.pop(0) - saved_at[epoch]))
            if proc.poll() is not None:
                break  # finished before this kill: its run is complete
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        Forked.run(*args, cwd=tmp_path)  # the last start runs to the end
        _same_run(run, full)
    assert kills >= 6, (kills, runs)


def test_a_kill_between_the_checkpoint_and_the_metrics_row_is_repaired(tmp_path,
                                                                     finished_run):
    # The state a kill right after saving last.pt leaves: the newest row missing from
    # metrics.csv and best.pt not yet the improved epoch's. (No process is killed here: the
    # starts run in-process, on a copy of the shared one-epoch run.)
    data = f"dataset.root={finished_run.parent / 'data'}"
    full, cut = tmp_path / "full", copy_run(finished_run, tmp_path / "cut")
    in_process("train", *TINY, "trainer.epochs=2", data, f"hydra.run.dir={full}",
               cwd=tmp_path)
    stale_best = (cut / "checkpoints/best.pt").read_bytes()
    in_process("train", *TINY, data, f"hydra.run.dir={cut}", "trainer.resume=true",
               "trainer.epochs=2", cwd=tmp_path)
    text = (cut / "metrics.csv").read_text().splitlines(keepends=True)
    (cut / "metrics.csv").write_text("".join(text[:-1]))
    (cut / "checkpoints/best.pt").write_bytes(stale_best)
    in_process("train", *TINY, data, f"hydra.run.dir={cut}", "trainer.resume=true",
               "trainer.epochs=2", cwd=tmp_path)  # nothing left to train
    _same_run(cut, full)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, finished_run):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        run = copy_run(finished_run, disk / "run")
        good = (run / "checkpoints/last.pt").read_bytes()
        filler = disk / "filler"
        with filler.open("wb", buffering=0) as f:  # fill what is left ...
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        # ... but for 64 KiB: Hydra's record of the start fits, a checkpoint does not
        os.truncate(filler, filler.stat().st_size - 65536)
        proc = in_process("train", *TINY, f"dataset.root={finished_run.parent / 'data'}",
                          f"hydra.run.dir={run}", "trainer.resume=true", "trainer.epochs=2",
                          cwd=tmp_path, check=False)
        one_line_failure(proc, "the disk is full")
        assert (run / "checkpoints/last.pt").read_bytes() == good
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_resume_with_another_batch_size_mid_epoch_is_refused(tmp_path):
    run = tmp_path / "run"
    _interrupt_mid_epoch(["train", *LONG, f"dataset.root={tmp_path / 'data'}",
                          f"hydra.run.dir={run}"], tmp_path, signal.SIGTERM)
    assert checkpoint.load(run / "checkpoints/last.pt")["state"].get("progress")
    proc = in_process("train", f"ckpt={run / 'checkpoints/last.pt'}", "trainer.batch_size=64",
                      cwd=tmp_path, check=False)
    one_line_failure(proc, "trainer.batch_size=64")


def test_a_text_run_resumes_with_its_own_vocabulary(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    base = ["dataset=text", f"dataset.path={corpus}", *TINY_RNN, "trainer.batch_size=8",
            "trainer.num_images=4", f"hydra.run.dir={run}"]
    in_process("train", *base, "trainer.epochs=1", cwd=tmp_path)
    vocab = checkpoint.load(run / "checkpoints/last.pt")["vocab"]
    with corpus.open("a") as f:  # the file edited since: new words, new frequencies
        f.write("zebra quokka axolotl\n" * 50)
    in_process("train", *base, "trainer.resume=true", "trainer.epochs=2", cwd=tmp_path)
    assert checkpoint.load(run / "checkpoints/last.pt")["vocab"] == vocab
