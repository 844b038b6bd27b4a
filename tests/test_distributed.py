"""Data parallelism under torchrun: 2 CPU processes over gloo, against one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import DATA, in_process

# Two optimizer steps of a global batch of 32 (16 per process).
STEPS = [*DATA, "dataset.n_train=64", "trainer.epochs=1", "model.hidden=[32]",
         "model.latent_dim=3", "trainer.log_every=1"]


def torchrun(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "vae_cli", "train", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints/last.pt", weights_only=True)["model"]


def train_loss(run: Path) -> float:
    with (run / "metrics.csv").open() as f:
        return float(next(csv.DictReader(f))["train_loss"])


def test_two_processes_take_the_step_of_one_with_the_same_global_batch(tmp_path):
    torchrun(*STEPS, cwd=tmp_path)
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # one run folder, whatever the ranks' clocks said
    ddp = runs[0]
    assert (ddp / ".hydra/config.yaml").is_file() and (ddp / "train.log").is_file()
    # the single process in-process (the real dispatcher, without a third interpreter start)
    in_process("train", *STEPS, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    one = tmp_path / "one"
    a, b = weights(ddp), weights(one)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert train_loss(ddp) == pytest.approx(train_loss(one), rel=1e-5)
    # the checkpoint is an ordinary one: scored and continued by a single process
    in_process("eval", f"ckpt={ddp / 'checkpoints/last.pt'}", "eval.iw_samples=5",
               "eval.disentanglement.metrics=[mig]", cwd=tmp_path)
    in_process("train", f"ckpt={ddp / 'checkpoints/last.pt'}", "trainer.epochs=2",
               cwd=tmp_path)
    with (ddp / "metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


@pytest.mark.parametrize("divergence", ["adversarial", "mmd"])
def test_batch_divergences_keep_replicas_in_step(tmp_path, divergence):
    """Each epoch the ranks compare weight fingerprints and stop if they differ: an
    adversarial critic outside DDP must average its own gradients to pass."""
    run = tmp_path / "run"
    extra = ["divergence.critic_steps=2", "divergence.hidden=16"] \
        if divergence == "adversarial" else []
    torchrun(*STEPS, "trainer.epochs=2", f"divergence={divergence}", *extra,
             f"hydra.run.dir={run}", cwd=tmp_path)
    assert len(list((run / "checkpoints").glob("*.pt"))) == 2
    # resumed on another world size: one process (this one) continues the two-process run
    in_process("train", f"ckpt={run / 'checkpoints/last.pt'}", "trainer.epochs=3",
               cwd=tmp_path)


def test_global_batch_must_divide_among_processes(tmp_path):
    proc = torchrun(*STEPS, "trainer.batch_size=33", f"hydra.run.dir={tmp_path / 'r'}",
                    cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "trainer.batch_size=33 (the global batch) must divide among 2" in proc.stderr


def test_vq_codebook_moving_averages_are_those_of_the_global_batch(tmp_path):
    """The EMA statistics are summed over ranks: two processes keep the codebook one
    process keeps (restarts off: they draw from each rank's own batch)."""
    vq = [*DATA, "dataset.n_train=64", "trainer.epochs=1", "model=conv", "model.channels=8",
          "model.latent_dim=4", "posterior=vq", "posterior.codes=8", "posterior.restart=0",
          "posterior.decay=0.5", "prior=uniform"]
    torchrun(*vq, f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    in_process("train", *vq, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert a["family.ema_count"].sum() > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_top_down_hierarchy_takes_the_step_of_one_process(tmp_path):
    """model=vdvae draws every layer's noise for the global batch and keeps its rows, as
    the one-layer posterior does: two processes end with one process's weights."""
    vdvae = [*DATA, "dataset.n_train=64", "trainer.epochs=1", "trainer.pictures=false",
             "model=vdvae", "model.width=8", "model.latent_dim=2", "model.resolutions=[2,4]",
             "model.layers=[1,1]", "model.enc_blocks=1"]
    torchrun(*vdvae, f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    in_process("train", *vdvae, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
