"""Runs survive interruption, checkpoints are never half-written, bad input gets one line."""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
import torch
from hostile import (
    Forked,
    copy_run,
    fork,
    in_process,
    write_checkpoints_forever,
)
from test_cli import DATA, TINY, rows, vae
from torchvision.io import write_png

from vae_cli import errors
from vae_cli.runtime import checkpoint
from vae_cli.training.loop import Window

REPO = Path(__file__).resolve().parents[1]
# Epochs of ~1 s (256 steps) so that a signal lands mid-epoch; log_every=1 checks each step.
LONG = [*TINY, "dataset.image_size=32", "dataset.n_train=8192", "model.hidden=[256]",
        "trainer.epochs=3", "trainer.log_every=1"]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _interrupt_mid_epoch(args: list[str], cwd: Path, sig: int) -> tuple[int, str]:
    """Run ``vae train`` with its stderr on a terminal, as a user sees it, and send ``sig``
    once the progress bar shows a step of epoch 2 done (a fixed sleep after epoch 1 can land
    before epoch 2 starts on a loaded machine). Returns the exit code and the last line."""
    main, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    # a process of its own, forked with the imports done, its stderr on the terminal
    proc = Forked(args, cwd, stderr=os.ttyname(tty))
    out, sent, end = "", False, time.time() + 300
    while time.time() < end:
        if select.select([main], [], [], 0.1)[0]:
            try:
                out += os.read(main, 65536).decode(errors="replace")
            except OSError:  # the terminal closed
                break
        elif proc.poll() is not None:  # the process is gone and all it wrote was read
            break
        if not sent and re.search(r"epoch 2/\d+:[^\r\n]*\| *[1-9]\d*/\d+", out):
            proc.send_signal(sig)
            sent = True
    os.close(tty)
    os.close(main)
    proc.wait(timeout=60)
    assert sent, f"epoch 2 never started: {out[-600:]}"
    lines = [x.strip() for x in re.split(r"[\r\n]+", out) if x.strip()]
    return proc.returncode, lines[-1] if lines else ""


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]


def test_preemption_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGTERM (a cluster preempting the job) and SIGINT (Ctrl-C), each against the same
    uninterrupted run (trained once: one test, so one process holds it). Every run is a
    process of its own, forked with the imports done."""
    data = f"dataset.root={tmp_path / 'data'}"
    full = tmp_path / "full"
    Forked.run("train", *LONG, data, f"hydra.run.dir={full}", cwd=tmp_path)
    for sig in (signal.SIGTERM, signal.SIGINT):
        run = interrupted(["train", *LONG, data], tmp_path / f"cut-{sig.name}", sig)
        saved = checkpoint.load(run / "checkpoints/last.pt")
        assert saved["state"]["epoch"] == 1 and saved["state"]["progress"]["batch"] > 0
        resumed_as(run, full)


def interrupted(args: list[str], run: Path, sig: int = signal.SIGTERM) -> Path:
    """``vae <args>`` into ``run``, stopped by ``sig`` inside epoch 2: one line naming the
    signal and the command that continues, exit 128 + sig."""
    code, line = _interrupt_mid_epoch([*args, f"hydra.run.dir={run}"], run.parent, sig)
    assert code == 128 + sig and signal.Signals(sig).name in line and "ckpt=" in line, line
    return run


def resumed_as(run: Path, full: Path) -> None:
    """Resume ``run`` to its end: the metrics (the same floats printed) and the weights of
    the uninterrupted run ``full``, bit for bit."""
    Forked.run("train", f"ckpt={run / 'checkpoints/last.pt'}", cwd=run.parent)
    assert rows(run) == rows(full)
    a, b = _weights(full), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_checkpoint_writes_never_leaves_it_unreadable(tmp_path):
    # the writer is forked with torch imported: each kill lands in its saving loop (after a
    # save of this attempt's completed), at points 70 ms apart from one attempt to the next
    target = tmp_path / "last.pt"
    seen = set()
    for attempt in range(12):
        before = _identity(target)
        writer = fork(write_checkpoints_forever, str(target))
        deadline = time.monotonic() + 60
        while _identity(target) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05 + 0.07 * attempt)
        writer.kill()
        writer.join()
        ckpt = checkpoint.load(target)  # raises if half-written
        assert torch.all(ckpt["model"]["w"] == ckpt["i"])
        seen.add(ckpt["i"])
    assert len(seen) > 1, "the writer never completed a checkpoint after the first"


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names, and when it was written (a save replaces it)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")  # one epoch of TINY, as base says
    base = [*TINY, f"dataset.root={finished_run.parent / 'data'}", f"hydra.run.dir={run}"]
    good = (run / "checkpoints/last.pt").read_bytes()
    proc = in_process("train", *base, "trainer.resume=true", "trainer.epochs=3",
                      "optim.lr=1e12", "trainer.log_every=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "non-finite at step" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (run / "checkpoints/last.pt").read_bytes() == good
    assert len(rows(run)) == 1


def test_a_run_its_patience_ended_stays_ended_when_started_again(tmp_path, finished_run):
    """bench/reproduce.sh starts every stage with trainer.resume=auto: a run that early
    stopping ended must not train another epoch when it is started again."""
    run = copy_run(finished_run, tmp_path / "run")  # one epoch of TINY
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    ckpt["state"]["bad_epochs"] = 2  # as the rule left it: two epochs without improvement
    torch.save(ckpt, run / "checkpoints/last.pt")
    base = [*TINY, f"dataset.root={finished_run.parent / 'data'}", f"hydra.run.dir={run}"]
    in_process("train", *base, "trainer.resume=true", "trainer.epochs=3", "trainer.patience=2",
               cwd=tmp_path)
    assert len(rows(run)) == 1
    in_process("train", *base, "trainer.resume=true", "trainer.epochs=3", "trainer.patience=3",
               cwd=tmp_path)  # a longer patience continues it
    assert len(rows(run)) > 1


def test_the_first_non_finite_step_of_a_window_is_named_exactly():
    """The loop checks the losses since its last sync point there, not at every step: the
    step named is still the first bad one, wherever it falls in the window."""
    window = Window()
    for step, loss in zip([5, 6, 6, 7, 8], [1.0, 2.0, math.inf, math.nan, 3.0], strict=True):
        window.add(torch.tensor([loss, 0.0])[0], step)
    assert window.first_bad().item() == 6
    assert not window.losses and not window.steps  # emptied at each check
    for step in (9, 10):
        window.add(torch.tensor(1.5), step)
    assert window.first_bad().item() == -1


def test_same_seed_gives_identical_metrics(tmp_path):
    for name in ("a", "b"):  # two processes of their own (forked with the imports done)
        Forked.run("train", *TINY, f"dataset.root={tmp_path / 'data'}",
                   f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, finished_run) -> Path:
    return copy_run(finished_run, tmp_path_factory.mktemp("battery") / "run")


def _battery(tmp: Path, run: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "corrupt").mkdir(exist_ok=True)
    for i in range(4):
        write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(tmp / f"corrupt/ok{i}.png"))
    (tmp / "corrupt/bad.png").write_bytes(b"\x89PNG not really")
    (tmp / "trunc.pt").write_bytes((run / "checkpoints/last.pt").read_bytes()[:1000])
    (tmp / "a_file").write_text("not a folder")
    d = f"dataset.root={tmp / 'data'}"
    rd = f"hydra.run.dir={run}"
    return [
        (["train", "model=transformer"], "model/transformer"),
        (["train", "trainer.epoch=3"], "trainer.epoch"),
        (["train", "trainer.epochs=abc"], "trainer.epochs"),
        (["train", "trainer.epochs=-1"], "trainer.epochs"),
        (["train", "trainer.batch_size=0"], "trainer.batch_size"),
        (["train", "model.latent_dim=0"], "model.latent_dim"),
        (["train", "model.hidden=[0]"], "model.hidden"),
        (["train", "optim.lr=0"], "optim.lr"),
        (["train", "divergence.beta=-1"], "divergence.beta"),
        (["train", "loss.sigma=0", "loss=gaussian"], "loss.sigma"),
        (["train", "+foo=1"], "foo"),
        (["train", "dataset.n_train=10", "trainer.batch_size=64", d], "batch_size"),
        (["train", "dataset=mnist", "dataset.download=false", d], "dataset.root"),
        (["train", "dataset=folder", f"dataset.path={tmp / 'empty'}"], "empty"),
        (["train", "dataset=folder", f"dataset.path={tmp / 'corrupt'}",
          "dataset.on_error=refuse"], "bad.png"),
        (["train", "dataset=folder"], "dataset.path"),
        (["train", "prior=mog", "divergence.estimator=analytic"], "estimator=mc"),
        (["train", "divergence=mmd", "trainer.iw_samples=4"], "divergence=kl"),
        (["train", "trainer.device=tpu"], "trainer.device"),
        (["train", *TINY, d, rd], "trainer.resume=true"),  # would overwrite the run
        (["train", *TINY, d, f"hydra.run.dir={tmp / 'a_file/run'}"], "hydra.run.dir"),
        # a model no machine holds: refused by its count before it is allocated, and
        # with the bounds lifted, the allocation's failure in one line
        (["train", *DATA, "model.hidden=[1000000000000]", d, f"hydra.run.dir={tmp / 'big'}"],
         "parameters, past the bound"),
        (["train", *DATA, "model.hidden=[1000000000000]", "limits=false", d,
          f"hydra.run.dir={tmp / 'big'}"], "out of memory in host memory (it asked for 74505.8"),
        (["train", "--nonsense"], "unrecognized"),
        (["eval"], "ckpt="),
        (["eval", f"ckpt={tmp / 'nope.pt'}"], "does not exist"),
        (["eval", f"ckpt={tmp / 'trunc.pt'}"], "not a readable vae checkpoint"),
        (["eval", f"ckpt={tmp / 'é.pt'}"], "must be quoted, as in 'ckpt=\""),  # Hydra's grammar
        (["eval", f"ckpt={run / 'checkpoints/last.pt'}", "eval.split=holdout"], "eval.split"),
        (["sample", f"ckpt={run / 'checkpoints/last.pt'}", "num_samples=0"], "num_samples"),
        (["sample", f"ckpt={run / 'metrics.csv'}"], "not a readable vae checkpoint"),
        (["compare", str(tmp / "empty")], "no runs"),
        (["frobnicate"], "unknown command"),
    ]


# The first cases of the battery also run as real processes (exit code and stderr end to
# end); the others go through the same dispatcher in this process, which is ~3 s a case
# faster (the imports).
END_TO_END = 3


def test_bad_input_battery(existing_run, tmp_path):
    before = _digest(existing_run)
    cases = _battery(tmp_path, existing_run)
    assert len(cases) >= 25
    failures = []
    for i, (args, fragment) in enumerate(cases):
        if i < END_TO_END:
            proc = vae(*args, cwd=tmp_path, check=False)
            code, stderr = proc.returncode, proc.stderr
        else:
            done = in_process(*args, cwd=tmp_path, check=False)
            code, stderr = done.returncode, done.stderr
        lines = stderr.strip().splitlines()
        if not (code != 0 and len(lines) == 1 and fragment in lines[0]
                and "Traceback" not in stderr):
            failures.append((args, code, stderr[-400:]))
    assert not failures, failures
    after = _digest(existing_run)
    # nothing in the existing run folder changed (a refused restart may add .hydra/again-*)
    assert {k: after.get(k) for k in before} == before


def test_out_of_memory_on_a_gpu_is_one_line_with_the_size():
    """torch's words for a GPU's allocation failure become the line the battery checks for
    the host's (no GPU here: the exception is the one torch raises there)."""
    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                               "total capacity of 79.11 GiB of which 1.50 GiB is free.")
    assert errors.out_of_memory(e).startswith(
        "out of memory on the GPU (it asked for 2.00 GiB at once): a smaller trainer.batch_size")
    assert errors.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_signal_inside_an_accumulated_step_waits_for_the_step_and_resumes_exactly(
        tmp_path):
    """With trainer.accumulate=3 a SIGTERM lands between batches whose gradients are being
    summed: the run stops where that optimizer step ends, and the resume gives the
    uninterrupted run's metrics and weights, bit for bit."""
    args = [*LONG, "trainer.accumulate=3", "trainer.epochs=2",
            f"dataset.root={tmp_path / 'data'}"]
    full = tmp_path / "full"
    Forked.run("train", *args, f"hydra.run.dir={full}", cwd=tmp_path)
    run = interrupted(["train", *args], tmp_path / "cut")
    saved = checkpoint.load(run / "checkpoints/last.pt")
    assert saved["state"]["progress"]["batch"] % 3 == 0  # at the end of a summed step
    resumed_as(run, full)
