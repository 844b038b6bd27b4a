"""Reliability class 2: a run folder belongs to one run. A second process is refused, a
checkpoint never continues into another run's folder, a folder removed mid-run is not
recreated, and a checkpoint kept among other files starts a folder of its own."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import time
from pathlib import Path

from hostile import Forked, copy_run, digest, in_process, one_line_failure, unchanged
from test_cli import TINY, rows
from test_reliability import LONG, _wait_for


def test_a_second_process_into_a_running_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    args = [*LONG, "trainer.epochs=2", f"dataset.root={tmp_path / 'data'}",
            f"hydra.run.dir={run}"]
    first = Forked(["train", *args], tmp_path)  # a process of its own
    _wait_for(run / "train.log", "parameters", first)  # past the lock, training
    # the second start from this process (another process than the first's)
    second = in_process("train", *args, "trainer.resume=true", cwd=tmp_path, check=False)
    one_line_failure(second, "in use by another vae train")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [r["epoch"] for r in rows(run)] == ["1", "2"]  # the first ran on, undisturbed


def test_a_checkpoint_does_not_continue_into_another_runs_folder(tmp_path, finished_run):
    a, b = copy_run(finished_run, tmp_path / "a"), copy_run(finished_run, tmp_path / "b")
    before = digest(b)
    proc = in_process("train", f"ckpt={a / 'checkpoints/last.pt'}", f"hydra.run.dir={b}",
                      "trainer.epochs=2", cwd=tmp_path, check=False)
    one_line_failure(proc, "holds another run")
    assert unchanged(before, b) and len(rows(b)) == 1


def test_a_folder_with_another_runs_files_but_no_checkpoint_is_refused(tmp_path,
                                                                     finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    before = digest(run)
    proc = in_process("train", *TINY, f"dataset.root={tmp_path / 'data'}",
                      f"hydra.run.dir={run}", cwd=tmp_path, check=False)
    one_line_failure(proc, "already holds a run")
    assert unchanged(before, run)


def test_a_checkpoint_continues_into_an_empty_folder_with_its_history(tmp_path,
                                                                    finished_run):
    a = copy_run(finished_run, tmp_path / "a")
    in_process("train", f"ckpt={a / 'checkpoints/last.pt'}", f"hydra.run.dir={tmp_path / 'b'}",
               "trainer.epochs=2", cwd=tmp_path)
    assert [r["epoch"] for r in rows(tmp_path / "b")] == ["1", "2"]
    assert rows(tmp_path / "b")[0] == rows(a)[0] and len(rows(a)) == 1


def test_a_run_folder_removed_while_training_is_not_recreated(tmp_path):
    run = tmp_path / "run"
    proc = Forked(["train", *LONG, f"dataset.root={tmp_path / 'data'}",
                   f"hydra.run.dir={run}"], tmp_path)
    _wait_for(run / "train.log", "parameters", proc)
    time.sleep(0.3)
    shutil.rmtree(run)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "was removed" in err, err
    assert not run.exists()


def test_a_checkpoint_among_other_files_starts_its_own_run_folder(tmp_path, finished_run):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copy(finished_run / "checkpoints/last.pt", shelf / "model.pt")
    (shelf / "notes.txt").write_text("mine")
    in_process("train", f"ckpt={shelf / 'model.pt'}", "trainer.epochs=2", cwd=tmp_path)
    assert sorted(p.name for p in shelf.iterdir()) == ["model.pt", "notes.txt"]
    (new,) = {m.parent for m in (tmp_path / "outputs").rglob("metrics.csv")}
    assert [r["epoch"] for r in rows(new)] == ["1", "2"]


def test_a_preset_resumes_with_its_own_command_line_and_a_relative_data_root(tmp_path):
    """What bench/reproduce.sh does: the same command again, experiment=... and a relative
    dataset.root included, continues the run; a preset of other components is refused."""
    args = ["experiment=beta_vae_shapes", "dataset.image_size=16", "dataset.n_train=64",
            "dataset.n_val=32", "dataset.n_test=32", "dataset.root=data", "trainer.epochs=1",
            "trainer.device=cpu", "trainer.num_images=4", f"hydra.run.dir={tmp_path / 'run'}",
            "trainer.resume=auto"]
    in_process("train", *args, cwd=tmp_path)
    in_process("train", *args[:-1], "trainer.epochs=2", "trainer.resume=true", cwd=tmp_path)
    with (tmp_path / "run/metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]
    proc = in_process("train", *args[1:], "experiment=factorvae_shapes", "trainer.epochs=3",
                      cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "experiment=factorvae_shapes gives another" in proc.stderr
    table = _repro_table()
    row = table.row(tmp_path / "run")  # the README's Reproductions row of that folder
    assert (row["preset"], row["epochs"], row["stopped by"], row["test NLL"]) == \
        ("beta_vae_shapes", 2, "epochs", "-")  # trainer.epochs=2 reached, not evaluated
    assert (row["steps"], row["scores"]) == ("2", "-")  # 64 images, batch 64
    (tmp_path / "run/eval.json").write_text(json.dumps(
        {"mig": 0.125, "factor_vae": 0.79, "nll_iwae": 50.0, "iw_samples": 10, "examples": 32}))
    row = table.row(tmp_path / "run")
    assert (row["test NLL"], row["scores"]) == ("50.00 (k=10, 32 images)",
                                                "MIG 0.125, FactorVAE 0.790")


def _repro_table():
    spec = importlib.util.spec_from_file_location(
        "repro_table", Path(__file__).parents[1] / "bench/repro_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reproductions_table_says_what_stopped_a_run():
    stopped_by = _repro_table().stopped_by
    val = [3.0, 2.0, 1.0, 1.5, 1.2]  # best at epoch 3, then two epochs without improvement
    assert stopped_by(val, 2, 2000) == "patience"
    assert stopped_by(val, 3, 2000) == "budget"
    assert stopped_by(val, None, 5) == stopped_by(val, 3, 5) == "epochs"


def test_the_reproductions_table_sums_the_wall_time_of_each_machine(tmp_path):
    """A row moved to a GPU and back lists each machine with its hours; one machine alone
    is named plainly."""
    wall = _repro_table().wall
    (tmp_path / "wall.txt").write_text(
        "3600 s on vm, AMD EPYC, 2 cores, OMP_NUM_THREADS=1: train, exit 0\n"
        "720 s on gpu, Intel Xeon, 16 cores, NVIDIA H200, OMP_NUM_THREADS=4: train, exit 0\n"
        "1800 s on vm, AMD EPYC, 2 cores, OMP_NUM_THREADS=1: train + eval, exit 0\n")
    assert wall(tmp_path) == (6120, "1.5 h on AMD EPYC, 2 cores, OMP_NUM_THREADS=1; 0.2 h on "
                                    "Intel Xeon, 16 cores, NVIDIA H200, OMP_NUM_THREADS=4")
    (tmp_path / "wall.txt").write_text("60 s on vm, AMD EPYC, 2 cores: train, exit 0\n")
    assert wall(tmp_path) == (60, "AMD EPYC, 2 cores")
