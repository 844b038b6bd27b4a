"""Reliability class 4: a signal at any stage of a command gives one line and exit 128 + n,
with what is resumable saved: mid-sweep (the sweep stops), during the final validation or
pictures, during `vae eval`. Each command is a process of its own, forked with the imports
done (hostile.Forked)."""

from __future__ import annotations

import signal
import time

from hostile import Forked, copy_run
from test_cli import TINY
from test_reliability import LONG, _wait_for

from vae_cli.runtime import checkpoint


def _stopped(proc, sig) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-600:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and sig.name in lines[0] and "Traceback" not in err, err[-600:]
    return lines[0]


def test_sigterm_stops_a_sweep_after_saving_the_current_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = Forked(["train", "-m", *LONG, f"dataset.root={tmp_path / 'data'}", "seed=0,1,2",
                   f"hydra.sweep.dir={sweep}"], tmp_path)
    _wait_for(sweep / "0/train.log", "epoch 1/3", proc)
    proc.send_signal(signal.SIGTERM)
    line = _stopped(proc, signal.SIGTERM)
    assert "ckpt=" in line and checkpoint.load(sweep / "0/checkpoints/last.pt")
    assert not (sweep / "1").exists()  # the sweep did not go on


def test_sigterm_during_the_final_pictures_is_not_swallowed(tmp_path):
    run = tmp_path / "run"
    # one epoch, then the final picture set over 4000 validation images (seconds of work)
    proc = Forked(["train", *TINY, "dataset.n_val=4000", "trainer.epochs=1",
                   f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run}"], tmp_path)
    _wait_for(run / "train.log", "epoch 1/1", proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    line = _stopped(proc, signal.SIGTERM)
    assert "ckpt=" in line and (run / "checkpoints/last.pt").is_file()


def test_sigint_during_eval_is_one_line(tmp_path, finished_run):
    # (vae sample goes through the same handler; it is too quick to interrupt reliably)
    run = copy_run(finished_run, tmp_path / "run")
    proc = Forked(["eval", "eval.iw_samples=300000", "limits=false",
                   f"ckpt={run / 'checkpoints/last.pt'}", f"out_dir={tmp_path / 'out'}"],
                  tmp_path)
    time.sleep(4)  # past start-up (a forked one: about a second), inside the sampling
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _stopped(proc, signal.SIGINT)
    assert not (tmp_path / "out/eval.json").exists()
