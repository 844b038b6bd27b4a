"""Every divergence with every prior (and every loss) trains from the command line."""

from __future__ import annotations

import csv
import math

import pytest
import yaml
from hostile import in_process
from test_cli import vae

DIVERGENCES = ["kl", "mmd", "sliced", "adversarial", "tc"]
PRIORS = ["normal", "learned", "mog", "vamp"]
LOSSES = ["bernoulli", "gaussian", "laplace", "mse", "categorical", "logistic"]
DATA = ["dataset=shapes", "dataset.image_size=16", "dataset.n_train=128", "dataset.n_val=32",
        "dataset.n_test=32", "trainer.epochs=1", "trainer.batch_size=32", "trainer.device=cpu",
        "trainer.num_images=8"]
SMALL = [*DATA, "model.hidden=[32]", "model.latent_dim=3"]
# The divergence and prior sweeps check that each pair trains; the pictures of every loss
# and architecture are drawn in test_every_loss_schedule_and_architecture.
QUIET = [*SMALL, "trainer.pictures=false"]


def _finite_rows(job) -> dict:
    with (job / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    bad = {k: v for k, v in row.items() if not math.isfinite(float(v))}
    assert not bad, f"{job}: non-finite {bad}"
    return row


def _sweep(tmp_path, *axes: str, base=SMALL, name="sweep", failed: int = 0) -> list:
    # In-process: the real dispatcher and Hydra's basic launcher, as a process runs them,
    # without a process's imports per sweep (test_cli and test_sweep_failures run sweeps as
    # processes of their own).
    sweep = tmp_path / name
    proc = in_process("train", "-m", *base, f"dataset.root={tmp_path / 'data'}", *axes,
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=not failed)
    if failed:  # the others ran; the exit code and one line say how many did not
        assert proc.returncode == 1 and f"{failed} of " in proc.stderr, proc.stderr
    jobs = (p for p in sweep.iterdir() if p.name.isdigit())  # not the sweep's .vae-jobs/
    return sorted(jobs, key=lambda p: int(p.name))


def test_every_divergence_with_every_prior(tmp_path):
    jobs = _sweep(tmp_path, f"divergence={','.join(DIVERGENCES)}", f"prior={','.join(PRIORS)}",
                  "divergence.beta=1.0", base=QUIET)
    assert len(jobs) == len(DIVERGENCES) * len(PRIORS)
    seen = set()
    for job in jobs:
        row = _finite_rows(job)
        choice = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        seen.add(tuple(sorted(o for o in choice if o.startswith(("divergence=", "prior=")))))
        assert "val_div" in row and (job / "checkpoints/best.pt").is_file()
    assert len(seen) == len(jobs)
    # One column per component: beta-TCVAE logs its three terms.
    tc_job = next(j for j in jobs if "divergence=tc" in (j / ".hydra/overrides.yaml").read_text())
    assert {"train_mi", "train_tc", "train_dwkl"} <= set(_finite_rows(tc_job))


def test_disentangling_divergences_train(tmp_path):
    # factorvae trains its discriminator as an auxiliary step; dip penalises the batch
    # covariance. Both log their KL apart from their weighted sum, so nelbo is reported.
    jobs = _sweep(tmp_path, "divergence=factorvae,dip", base=QUIET)
    columns = [set(_finite_rows(job)) for job in jobs]
    assert {"train_tc", "val_tc", "val_kl", "val_nelbo"} <= columns[0]
    assert {"train_dip", "val_dip", "val_kl", "val_nelbo"} <= columns[1]


def test_every_critic_constraint_with_every_prior(tmp_path):
    jobs = _sweep(tmp_path, "divergence=adversarial", "divergence.lipschitz=clip,spectral",
                  f"prior={','.join(PRIORS)}", "divergence.critic_steps=1", base=QUIET)
    assert len(jobs) == 2 * len(PRIORS)
    for job in jobs:
        assert "val_div" in _finite_rows(job)


def test_every_loss_schedule_and_architecture(tmp_path):
    runs = [_sweep(tmp_path, f"loss={','.join(LOSSES)}", name="losses"),
            _sweep(tmp_path, "schedule=linear,cyclical,capacity", "trainer.iw_samples=1,4",
                   name="schedules", failed=1),
            *(_sweep(tmp_path, f"model={net}", "model.channels=8", "model.latent_dim=3",
                     "loss=bernoulli,logistic", base=DATA, name=net) for net in ("conv", "resnet"))]
    assert [len(r) for r in runs] == [len(LOSSES), 6, 2, 2]
    refused = []
    for job in (j for r in runs for j in r):
        overrides = (job / ".hydra/overrides.yaml").read_text()
        if "schedule=capacity" in overrides and "trainer.iw_samples=4" in overrides:
            refused.append(job)  # |KL - C| has no importance-weighted form: refused, one line
            assert "job failed: schedule=capacity" in (job / "train.log").read_text()
            assert not (job / "metrics.csv").exists()
        else:
            _finite_rows(job)
    assert len(refused) == 1


@pytest.mark.parametrize("args, fragment", [
    (["prior=mog", "divergence.estimator=analytic"], "estimator=mc"),
    (["prior=vamp", "divergence.free_bits=0.5"], "free_bits"),
    (["divergence=mmd", "trainer.iw_samples=5"], "divergence=kl"),
    (["divergence=mmd", "divergence.kernel=cosine"], "divergence.kernel"),
    (["model=resnet", "dataset.image_size=18"], "model=resnet"),
    # settings an importance-weighted bound cannot honour (once dropped without a word)
    (["trainer.iw_samples=4", "schedule=capacity"], "schedule=capacity"),
    (["trainer.iw_samples=4", "divergence=tc"], "divergence=tc"),
    (["trainer.iw_samples=4", "divergence.free_bits=0.5"], "free_bits"),
    (["trainer.iw_samples=4", "divergence=factorvae"], "divergence=factorvae"),
    # DIP's penalty pulls q(z)'s covariance to the identity: N(0, I)'s, no other prior's
    (["divergence=dip", "prior=learned"], "prior=normal"),
])
def test_impossible_combinations_are_refused_at_start(tmp_path, args, fragment):
    argv = ["train", *DATA, f"dataset.root={tmp_path}", *args,
            f"hydra.run.dir={tmp_path / 'run'}"]
    if fragment == "estimator=mc":  # one case in a process of its own, end to end
        proc = vae(*argv, cwd=tmp_path, check=False)
    else:
        proc = in_process(*argv, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and fragment in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run/metrics.csv").exists()
