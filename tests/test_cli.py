"""The real `vae` command in a subprocess on tiny offline data: train -> eval -> sample,
resume, sweeps, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_cli.errors import UserError

DATA = ["dataset=shapes", "dataset.image_size=16", "dataset.n_train=256", "dataset.n_val=64",
        "dataset.n_test=64", "trainer.batch_size=32", "trainer.epochs=2", "trainer.device=cpu",
        "trainer.num_images=16"]
TINY = [*DATA, "model.hidden=[64]", "model.latent_dim=4"]
# MIG only: the other disentanglement metrics draw many observations, and have their own tests
MIG = "eval.disentanglement.metrics=[mig]"


def vae(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "vae_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"vae {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_process(*args: str, cwd: Path, check: bool = True):
    """`vae <args>` through the same dispatcher in this process (hostile.in_process), for
    the starts a test needs rather than checks as a process of its own: each test here
    still runs the real command end to end at least once where that is what it checks."""
    from hostile import in_process as run  # hostile imports this module

    return run(*args, cwd=cwd, check=check)


def rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    vae("train", *TINY, f"dataset.root={tmp / 'data'}", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    return tmp / "run"


def test_train_writes_a_complete_run_folder(trained):
    for name in ["checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv",
                 ".hydra/config.yaml", "images/reconstructions_002.png",
                 "images/samples_002.png", "train.log"]:
        assert (trained / name).is_file(), name
    table = rows(trained)
    assert [r["epoch"] for r in table] == ["1", "2"]
    for key in ["train_loss", "train_recon", "train_div", "val_loss", "val_nelbo", "val_bpd"]:
        assert torch.isfinite(torch.tensor(float(table[-1][key]))), key
    ckpt = torch.load(trained / "checkpoints/last.pt", weights_only=True)
    assert ckpt["config"]["model"]["latent_dim"] == 4 and ckpt["state"]["epoch"] == 2


def test_eval_writes_json_and_prints_a_table(trained):
    out = vae("eval", f"ckpt={trained / 'checkpoints/best.pt'}", "eval.split=val",
              "eval.iw_samples=20", MIG, cwd=trained.parent)
    result = json.loads((trained / "eval_val.json").read_text())
    assert result["split"] == "val" and result["examples"] == 64
    assert result["nelbo"] == pytest.approx(result["recon"] + result["div"])
    assert result["bpd"] > 0 and "nelbo" in out.stdout and "nll_iwae" in out.stdout
    assert result["nll_iwae"] <= result["nelbo_iw"]
    assert 0 <= result["active_units"] <= 4 and len(result["kl_per_dim"]) == 4
    assert set(result["mig_per_factor"]) <= {"shape", "scale", "orientation", "posX", "posY"}
    # the prior's samples scored on features of vae's own shapes classifier, named as such
    assert result["fd_shapes_features"] >= 0 and result["fd_sampler"] == "prior"
    assert "not comparable to Inception FID" in result["fd_features"]
    assert "fd_shapes_features" in out.stdout and result["fd_samples"] == 1000
    # in-process from here: the same dispatcher, without another interpreter start
    in_process("eval", f"ckpt={trained / 'checkpoints/best.pt'}", "eval.iw_samples=5",
               "eval.max_examples=10", MIG, "fd.samples=0", cwd=trained.parent)
    assert json.loads((trained / "eval.json").read_text())["split"] == "test"


def test_sample_writes_grid_tensor_and_pictures(trained):
    out = vae("sample", f"ckpt={trained / 'checkpoints/best.pt'}", "num_samples=10", "seed=3",
              cwd=trained.parent)
    assert (trained / "samples_seed3.png").is_file()
    saved = torch.load(trained / "samples_seed3.pt", weights_only=True)
    assert saved["images"].shape == (10, 1, 16, 16) and saved["z"].shape == (10, 4)
    assert 0 <= saved["images"].min() and saved["images"].max() <= 1
    for name in ("reconstructions", "interpolations", "traversals", "latent_scatter", "curves"):
        assert (trained / f"{name}.png").is_file() and name in out.stdout


def test_fitted_samplers_sample_end_to_end_and_are_scored(trained, compose_cfg):
    from vae_cli.commands import sample

    ckpt = f"ckpt={trained / 'checkpoints/best.pt'}"
    # in-process (test_sample_writes_grid_tensor_and_pictures runs a sample process): the
    # dispatcher for the first, the command's function for the others
    out = in_process("sample", ckpt, "sampler=gmm", "sampler.components=3", "num_samples=10",
                     "fd.samples=32", "pictures=false", cwd=trained.parent)
    assert "fitting" in out.stdout and "fd_shapes_features" in out.stdout
    sample.run(compose_cfg([ckpt, "sampler=two_stage", "sampler.steps=50",
                            "sampler.hidden=[16]", "num_samples=10", "fd.samples=32",
                            "pictures=false"], name="sample"))
    for name in ("gmm", "two_stage"):
        saved = torch.load(trained / f"samples_{name}_seed0.pt", weights_only=True)
        assert saved["images"].shape == (10, 1, 16, 16) and saved["z"].shape == (10, 4)
        assert (trained / f"samples_{name}_seed0.png").is_file()
        assert (trained / "samplers" / f"{name}_best.pt").is_file()
        score = json.loads((trained / f"samples_{name}_seed0.json").read_text())
        assert score["fd_sampler"] == name and score["fd_shapes_features"] >= 0
    before = torch.load(trained / "samples_gmm_seed0.pt", weights_only=True)["z"]
    sample.run(compose_cfg([ckpt, "sampler=gmm", "sampler.components=3", "num_samples=10",
                            "pictures=false"], name="sample"))
    assert torch.equal(torch.load(trained / "samples_gmm_seed0.pt", weights_only=True)["z"],
                       before)  # the saved fit reused, the same seed: the same draws


def test_a_tempered_prior_draw_is_its_own_file_and_a_fitted_sampler_refuses_one(
        trained, compose_cfg):
    from vae_cli.commands import sample

    ckpt = f"ckpt={trained / 'checkpoints/best.pt'}"
    for seed in (0, 1):  # at temperature 0 every draw is the prior's mean: seeds agree
        sample.run(compose_cfg([ckpt, "temperature=0", f"seed={seed}", "num_samples=4",
                                "pictures=false"], name="sample"))
    first, second = (torch.load(trained / f"samples_t0_seed{s}.pt", weights_only=True)
                     for s in (0, 1))
    assert torch.equal(first["z"], torch.zeros(4, 4)) and torch.equal(first["images"],
                                                                      second["images"])
    with pytest.raises(UserError, match="sampler=gmm draws from its own fit"):
        sample.run(compose_cfg([ckpt, "temperature=0.5", "sampler=gmm"], name="sample"))


def test_compare_reads_a_multirun(tmp_path):
    # the sweep and the eval that compare reads run in-process (test_multirun_sweep_gives_
    # one_folder_per_job runs a sweep as a process); compare itself end to end
    sweep = tmp_path / "sweep"
    in_process("train", "-m", *TINY, "trainer.epochs=1", f"dataset.root={tmp_path / 'data'}",
               "model.latent_dim=2,3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    in_process("eval", f"ckpt={sweep / '0/checkpoints/best.pt'}", "eval.iw_samples=2", MIG,
               cwd=tmp_path)
    out = vae("compare", str(sweep), "--sort", "model.latent_dim", "--desc", cwd=tmp_path)
    with (sweep / "compare.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["model.latent_dim"] for r in table] == ["3", "2"]
    assert table[1]["test_nll"] and not table[0]["test_nll"]
    assert "model.latent_dim" in out.stdout and (sweep / "compare.md").is_file()
    bad = in_process("compare", str(sweep), "--sort", "nope", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "not a column" in bad.stderr
    empty = in_process("compare", str(tmp_path / "data"), cwd=tmp_path, check=False)
    assert empty.returncode == 2 and "no runs" in empty.stderr


def test_the_old_tensorboard_flag_names_the_logger_option(tmp_path):
    # TensorBoard itself is tested with the other trackers (test_loggers.py)
    proc = vae("train", *TINY, "trainer.tensorboard=true", f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.tensorboard is gone; use logger=tensorboard (the logger group: csv, "
        "tensorboard, mlflow, wandb)"]


def test_resume_equals_uninterrupted_run(tmp_path):
    # in-process: what is checked is the runs' files (test_reliability resumes processes)
    data = f"dataset.root={tmp_path / 'data'}"
    in_process("train", *TINY, data, "trainer.epochs=3", f"hydra.run.dir={tmp_path / 'full'}",
               cwd=tmp_path)
    in_process("train", *TINY, data, f"hydra.run.dir={tmp_path / 'part'}", cwd=tmp_path)
    original = (tmp_path / "part/.hydra/config.yaml").read_text()
    in_process("train", f"ckpt={tmp_path / 'part/checkpoints/last.pt'}", "trainer.epochs=3",
               cwd=tmp_path)
    full, part = rows(tmp_path / "full"), rows(tmp_path / "part")
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in part] == \
           [{k: v for k, v in r.items() if k not in drop} for r in full]
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part/.hydra/config.yaml").read_text() == original
    assert list((tmp_path / "part/.hydra").glob("again-*/config.yaml"))


def test_resume_flag_and_refusals(tmp_path):
    run = tmp_path / "run"
    base = [*TINY, f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run}"]
    # in-process: the same dispatcher (test_reliability's battery refuses a second start
    # into a run as a process of its own)
    in_process("train", *base, "trainer.epochs=1", cwd=tmp_path)
    again = in_process("train", *base, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "trainer.resume=true" in again.stderr
    in_process("train", *base, "trainer.resume=true", cwd=tmp_path)
    assert len(rows(run)) == 2
    changed = in_process("train", *base, "trainer.resume=true", "trainer.epochs=3",
                         "model.latent_dim=5", cwd=tmp_path, check=False)
    assert changed.returncode == 2 and "model.latent_dim=5" in changed.stderr
    assert len(rows(run)) == 2


def test_a_time_budget_stops_between_epochs_and_the_same_command_continues(tmp_path):
    # a budget no epoch fits: each invocation trains one epoch, saves it and ends cleanly
    run = tmp_path / "run"
    base = [*TINY, f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run}",
            "trainer.epochs=3", "trainer.max_minutes=1e-4", "trainer.resume=auto"]
    first = vae("train", *base, cwd=tmp_path)  # a process: how it ends, what it says
    assert "time limit" in first.stderr + first.stdout and len(rows(run)) == 1
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["state"]["epoch"] == 1
    again = in_process("train", *base, cwd=tmp_path)  # the same command, in-process
    assert "time limit" in again.stderr + again.stdout
    assert [r["epoch"] for r in rows(run)] == ["1", "2"]
    in_process("train", *base, "trainer.max_minutes=null", cwd=tmp_path)  # to the end
    assert [r["epoch"] for r in rows(run)] == ["1", "2", "3"]


def test_the_next_epoch_is_predicted_past_one_stretched_epoch():
    from vae_cli.training.recipe import next_epoch

    assert next_epoch([31.0]) == 31.0
    assert next_epoch([30.0, 31.0, 4483.0]) == 31.0  # one epoch that spanned a pause
    assert next_epoch([30.0, 40.0, 50.0, 60.0, 70.0, 80.0]) == 60.0  # the last five
    assert next_epoch([30.0, 30.0, 90.0, 90.0, 90.0]) == 90.0  # a lasting slowdown counts


def test_multirun_sweep_gives_one_folder_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    vae("train", "-m", *DATA, "trainer.epochs=1", f"dataset.root={tmp_path / 'data'}",
        "model=mlp,conv", "model.latent_dim=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    for job in ("0", "1"):
        assert len(rows(sweep / job)) == 1
        assert (sweep / job / "checkpoints/best.pt").is_file()
    assert "conv" in (sweep / "1/.hydra/config.yaml").read_text()


def test_help_and_cfg(tmp_path):
    assert "train" in vae("--help", cwd=tmp_path).stdout
    # the Hydra app's own flags in-process (test_wheel_ships_the_config_tree runs --cfg job
    # as a process)
    assert "vae train" in in_process("train", "--help", cwd=tmp_path).stdout
    job = in_process("train", "--cfg", "job", "model=conv", cwd=tmp_path).stdout
    assert "vae_cli.nets.conv.build" in job and "latent_dim" in job


@pytest.mark.parametrize("args, fragment", [
    (["train", "trainer.epochs=abc"], "trainer.epochs"),
    (["train", "model.latent_dim=0"], "model.latent_dim"),
    (["train", "trainer.batch_size=100000", "dataset.n_train=64"], "batch_size"),
    (["eval"], "ckpt"),
    (["eval", "ckpt=nowhere/best.pt"], "does not exist"),
    (["sample", "ckpt=README.md"], "not a readable vae checkpoint"),
    (["bogus"], "unknown command"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, args, fragment):
    from hostile import in_process

    if args[0] == "sample":
        (tmp_path / "README.md").write_text("not a checkpoint\n")
    if args[0] == "train":
        args = [*args, f"hydra.run.dir={tmp_path / 'run'}", f"dataset.root={tmp_path}"]
    if args[0] == "bogus":  # end to end: the process's exit code and stderr
        proc = vae(*args, cwd=tmp_path, check=False)
    else:  # the same dispatcher in this process
        proc = in_process(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_group_option_is_refused(tmp_path):
    # in-process; test_reliability's battery runs the same case as a process of its own
    proc = in_process("train", "model=transformer", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "model/transformer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wheel_ships_the_config_tree(tmp_path):
    """A non-editable install must find configs/ inside the package."""
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(repo)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "vae_cli/configs/train.yaml" in names and "vae_cli/configs/model/conv.yaml" in names
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import vae_cli.config.registry as c; print(c.config_dir())"
    where = subprocess.run([sys.executable, "-c", probe],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    job = subprocess.run([sys.executable, "-m", "vae_cli", "train", "--cfg", "job"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True)
    assert "vae_cli.data.shapes" in job.stdout


def test_cli_import_stays_light():
    """`vae train --cfg job` and `vae --help` must not pay for torch or matplotlib."""
    code = ("import sys, vae_cli, vae_cli.commands.main, vae_cli.errors; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'torchvision', 'tensorboard') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
