"""Sweeps through Hydra's own launcher and sweeper plugins (installed by the test extra):
joblib jobs side by side, submitit's local executor, and an Optuna search."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import yaml
from test_cli import DATA, in_process, vae

SMALL = [*DATA, "trainer.epochs=1", "model.hidden=[32]", "dataset.cache=false"]


def needs(plugin: str):
    found = importlib.util.find_spec(f"hydra_plugins.{plugin}") is not None
    return pytest.mark.skipif(not found, reason=f"{plugin} is not installed")


def sweep_dir(tmp_path):
    (stamp,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    return stamp


@needs("hydra_joblib_launcher")
def test_joblib_runs_jobs_side_by_side_and_a_failed_job_spares_the_others(tmp_path):
    out = vae("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
              "model.latent_dim=2,0,3", *SMALL, cwd=tmp_path, check=False)
    # the sweep ran every job, then said which failed (the summary comes from this process,
    # the jobs ran in joblib's workers)
    assert out.returncode == 1 and "1 of 3 sweep jobs failed" in out.stderr, out.stderr
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    assert "job failed: model.latent_dim=0 must be a positive integer" in out.stdout + out.stderr
    root = sweep_dir(tmp_path)
    done = sorted(p.name for p in root.iterdir() if (p / "checkpoints/best.pt").is_file())
    assert done == ["0", "2"]
    vae("compare", str(root), cwd=tmp_path)
    with (root / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    epochs = {r["model.latent_dim"]: r["epochs"] for r in table}
    assert epochs == {"2": "1", "0": "0", "3": "1"}  # the failed job is listed, 0 epochs


@needs("hydra_submitit_launcher")
def test_submitit_local_runs_a_job(tmp_path):
    vae("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
        *SMALL, cwd=tmp_path)
    root = sweep_dir(tmp_path)
    assert (root / "0" / "checkpoints/best.pt").is_file()
    assert (root / ".submitit").is_dir()  # submitit's own job records


@needs("hydra_submitit_launcher")
def test_slurm_preset_composes_onto_the_plugin(tmp_path):
    # in-process: the config Hydra composes, printed by the real dispatcher
    out = in_process("train", "hydra/launcher=slurm_gpu", "--cfg", "hydra", "-p",
                     "hydra.launcher", cwd=tmp_path)
    launcher = yaml.safe_load(out.stdout)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == 1 and launcher["timeout_min"] == 240


@needs("hydra_optuna_sweeper")
def test_optuna_search_minimises_the_returned_validation_loss(tmp_path):
    # in-process: the plugin's sweeper runs its trials in this process either way (Hydra's
    # basic launcher); what is saved is an interpreter start
    in_process("train", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *SMALL,
               cwd=tmp_path)
    root = sweep_dir(tmp_path)
    result = yaml.safe_load((root / "optimization_results.yaml").read_text())
    losses = {}
    for run in root.iterdir():
        if (run / "metrics.csv").is_file():
            with (run / "metrics.csv").open() as f:
                losses[run.name] = min(float(r["val_loss"]) for r in csv.DictReader(f))
    assert len(losses) == 3
    assert result["best_value"] == pytest.approx(min(losses.values()), rel=1e-5)
    assert {"optim.lr", "divergence.beta", "model.latent_dim"} == set(result["best_params"])


@needs("hydra_optuna_sweeper")
@pytest.mark.parametrize("args, code, line", [
    (["hydra.sweeper.n_trials=0"], 2, "error: hydra.sweeper.n_trials=0 runs no trial"),
    (["hydra.sweeper.n_trials=1", "trainer.epochs=-1"], 1,
     "error: no job of the sweep completed: 1 of 1 sweep jobs failed; their logs:")])
def test_an_optuna_search_that_completes_no_trial_ends_in_one_line(tmp_path, args, code,
                                                                    line):
    # Optuna itself then fails ("No trials are completed yet"): the cause is what is said
    out = in_process("train", "hparams_search=optuna", *SMALL, *args, cwd=tmp_path,
                     check=False)
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert out.returncode == code and len(errors) == 1 and errors[0].startswith(line), \
        out.stderr[-600:]
    assert "Traceback" not in out.stderr + out.stdout


def test_resume_auto_starts_fresh_then_continues_like_a_requeued_job(tmp_path):
    # in-process through the real dispatcher; the refusal as a process of its own
    run = tmp_path / "run"
    in_process("train", *SMALL, "trainer.resume=auto", f"hydra.run.dir={run}", cwd=tmp_path)
    in_process("train", *SMALL, "trainer.resume=auto", "trainer.epochs=2",
               f"hydra.run.dir={run}", cwd=tmp_path)
    with (run / "metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    bad = vae("train", *SMALL, "trainer.resume=maybe", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "trainer.resume='maybe' is not true, false or auto" in \
        bad.stderr


@pytest.mark.parametrize("launcher, sweeper, threads", [
    ({"n_jobs": 2}, {}, 4), ({"n_jobs": -1}, {}, 1), ({"n_jobs": -1}, {"n_jobs": 4}, 2),
    ({}, {}, None)])
def test_jobs_side_by_side_share_the_cores(monkeypatch, launcher, sweeper, threads):
    import torch
    from omegaconf import OmegaConf

    from vae_cli.commands.train import share_cores

    before = torch.get_num_threads()
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    try:
        share_cores(OmegaConf.create({"launcher": launcher, "sweeper": sweeper}))
        assert torch.get_num_threads() == (threads or before)
    finally:
        torch.set_num_threads(before)
