"""Reliability class 1: a checkpoint or command line names registered components, never
arbitrary functions, and a checkpoint's config is never resolved against this machine."""

from __future__ import annotations

import pytest
import torch
from hostile import copy_run, digest, doctored, in_process, one_line_failure, unchanged
from test_cli import vae

from vae_cli.config.build import load_trained
from vae_cli.errors import UserError
from vae_cli.runtime import checkpoint
from vae_cli.training.state import TrainState


@pytest.fixture
def run(finished_run):
    return finished_run  # only read (doctored copies are written elsewhere)


def _set(group, key, value):
    def edit(config):
        config[group][key] = value
    return edit


CASES = {
    # a package function that writes files when called, with the arguments to do so
    "package_function": (lambda c: c.update(loss={"_target_": "vae_cli.commands.compare.main",
                                                   "argv": ["DIR"]}), "outside vae_cli"),
    "foreign_function": (_set("loss", "_target_", "os.system"), "outside vae_cli"),
    "other_group": (_set("loss", "_target_", "vae_cli.nets.mlp.build"), "outside vae_cli"),
    "nested_target": (_set("dataset", "extra", {"_target_": "vae_cli.data.shapes.shapes"}),
                      "outside vae_cli"),
    "logger_function": (_set("logger", "_target_", "os.system"), "outside vae_cli"),
    "env_interpolation": (_set("dataset", "root", "${oc.env:HOME}"), "interpolation"),
    "self_interpolation": (_set("model", "latent_dim", "${trainer.epochs}"), "interpolation"),
    # a config asking for a model no machine holds: refused before it is allocated
    "giant_model": (_set("model", "hidden", [10**12]), "does not match its own config"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_doctored_checkpoint_is_refused_by_every_reader(run, tmp_path, case):
    # in-process: the functions eval/sample and a resume go through
    edit, fragment = CASES[case]
    bad = doctored(run / "checkpoints/last.pt", tmp_path / "bad.pt", edit)
    with pytest.raises(UserError, match=fragment):
        load_trained(str(bad), torch.device("cpu"))


@pytest.mark.parametrize("command, case", [  # every case in-process above; each reader here
    ("eval", "package_function"), ("sample", "self_interpolation"),
    ("train", "env_interpolation"),
])
def test_doctored_checkpoint_is_refused_before_anything_runs(run, tmp_path, command, case):
    edit, fragment = CASES[case]
    bad = doctored(run / "checkpoints/last.pt", tmp_path / "bad/checkpoints/last.pt", edit)
    before = digest(run)
    args = [f"ckpt={bad}", f"out_dir={tmp_path / 'out'}"] if command != "train" else [
        f"ckpt={bad}", f"hydra.run.dir={tmp_path / 'new'}"]
    # eval as a process of its own (exit code and stderr end to end), the others through
    # the same dispatcher in this process
    proc = (vae if command == "eval" else in_process)(command, *args, cwd=tmp_path,
                                                      check=False)
    one_line_failure(proc, fragment)
    assert unchanged(before, run)
    assert not list(tmp_path.rglob("compare.*")) and not (tmp_path / "out").exists()
    assert not (tmp_path / "new/checkpoints").exists()


@pytest.mark.parametrize("override", ["loss._target_=vae_cli.commands.compare.main",
                                      "model._target_=builtins.eval"])
def test_command_line_targets_are_registered_components_only(tmp_path, override):
    start = vae if override.startswith("loss.") else in_process  # one end to end
    proc = start("train", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                 check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run/checkpoints").exists() and not list(tmp_path.rglob("compare.*"))


@pytest.mark.parametrize("key, value, fragment", [
    ("shape", "abc", "data shape"),
    ("shape", [1, -5, 3], "data shape"),
    ("model", {"w": "not a tensor"}, "weights"),
    ("vocab", {"itos": [1, 2], "tokens": "word"}, "vocabulary"),
    ("vocab", {"itos": ["<pad>", "x", "x"], "tokens": "word"}, "vocabulary"),  # ambiguous
    ("dataset_size", -1, "dataset size"),
    ("state", [1, 2], "'state'"),
    ("config", lambda c: c["dataset"].update(image_size=-16), "image_size=-16 but its exa"),
    ("config", lambda c: c["dataset"].update(image_size=8), "image_size=8 but its exa"),
])
def test_a_damaged_layout_is_refused_on_load(run, tmp_path, key, value, fragment):
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    ckpt.pop("format")
    if callable(value):
        value(ckpt[key])
    else:
        ckpt[key] = value
    checkpoint.save(tmp_path / "bad.pt", ckpt)
    with pytest.raises(UserError, match=fragment):
        checkpoint.load(tmp_path / "bad.pt")


def test_a_damaged_training_state_is_refused_on_resume(run, tmp_path):
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=True)
    ckpt.pop("format")
    del ckpt["state"]["step"], ckpt["rng"]["order"]
    (tmp_path / "r/checkpoints").mkdir(parents=True)
    checkpoint.save(tmp_path / "r/checkpoints/last.pt", ckpt)
    proc = in_process("train", f"ckpt={tmp_path / 'r/checkpoints/last.pt'}",
                      "trainer.epochs=2", cwd=tmp_path, check=False)
    one_line_failure(proc, "cannot be resumed")


@pytest.mark.parametrize("key, value", [
    ("epoch", "one"), ("epoch", -1), ("step", -100), ("bad_epochs", 2.5),
    ("best_val", float("nan")), ("best_epoch", 99), ("rows", "garbage"),
    ("rows", [{"epoch": "x", "zzz": 1}]),
])
def test_impossible_counters_are_refused(run, key, value):
    # a wrong counter would retrain, skip or misreport epochs, or crash the reports later
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)["state"]
    assert TrainState.from_dict(state).epoch == 1  # the real one loads
    state[key] = value
    with pytest.raises(ValueError, match=f"state.{key}"):
        TrainState.from_dict(state)


def _moments_of_another_shape(ckpt):
    for s in ckpt["optim"]["state"].values():
        s["exp_avg"] = torch.zeros(2)


def _rows_of_another_run(ckpt):
    ckpt["state"]["rows"] = [{"epoch": "x", "zzz": 1}]


@pytest.mark.parametrize("edit, fragment", [
    # torch loads moments of any shape; its fused Adam then read past their end (a crash)
    (_moments_of_another_shape, "optimizer state 'exp_avg' of shape [2]"),
    (_rows_of_another_run, "state.rows[0]"),
])
def test_a_doctored_resume_is_refused_before_the_run_changes(run, tmp_path, edit, fragment):
    own = copy_run(run, tmp_path / "own")
    ckpt = torch.load(own / "checkpoints/last.pt", weights_only=True)
    ckpt.pop("format")
    edit(ckpt)
    checkpoint.save(own / "checkpoints/last.pt", ckpt)
    before = digest(own)
    # a process of its own: a crash fails this test instead of ending pytest
    start = vae if edit is _moments_of_another_shape else in_process
    proc = start("train", f"hydra.run.dir={own}", "trainer.resume=true", "trainer.epochs=2",
                 cwd=tmp_path, check=False)
    one_line_failure(proc, fragment)
    assert unchanged(before, own)  # its log too: the lines of the data loaded are taken back


def test_a_resume_refuses_another_seed(run, tmp_path):
    # the saved random streams continue: seed=5 would be recorded yet change nothing
    own = copy_run(run, tmp_path / "own")
    proc = in_process("train", f"hydra.run.dir={own}", "trainer.resume=true",
                      "trainer.epochs=2", "seed=5", cwd=tmp_path, check=False)
    one_line_failure(proc, "seed=5 differs from the run's (0)")


def test_a_folder_or_a_link_loop_given_as_a_checkpoint_is_named_so(tmp_path):
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    for path, what in ((tmp_path, "is a folder"), (loop, "is a link to no file"),
                       (tmp_path / "none.pt", "does not exist")):
        with pytest.raises(UserError, match=what):
            checkpoint.load(path)
