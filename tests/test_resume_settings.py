"""What a resume may change in the trainer's settings, checked in-process on tiny runs:
a logged term that comes or goes (trainer.grad_clip's gradient norm) leaves empty cells that
every reader of metrics.csv copes with; a schedule laid over the whole run (cosine) refuses a
new length in one line instead of bending its curve."""

import csv

import pytest

from vae_cli.commands.train import train
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.reports.comparison import build_table
from vae_cli.runtime.run_folder import read_metrics, write_metrics


def _tiny(tmp):
    return [f"dataset.root={tmp / 'data'}", "dataset.image_size=16", "dataset.n_train=64",
            "dataset.n_val=16", "dataset.n_test=16", "model.hidden=[16]", "model.latent_dim=2",
            "trainer.batch_size=32", "trainer.device=cpu", "trainer.num_images=4"]


def _train(compose, tmp, *extra):
    overrides = [*_tiny(tmp), *extra]
    return train(validate_train(compose(overrides)), tmp / "run", overrides)


def test_metrics_columns_are_every_rows_in_order_of_appearance(tmp_path):
    path = tmp_path / "metrics.csv"
    write_metrics(path, [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "grad": 0.25},
                         {"epoch": 3, "loss": 1.0}])
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == ["epoch", "loss", "grad"]
    assert [r["grad"] for r in read_metrics(path)] == ["", "0.25", ""]


def test_a_resume_may_add_and_drop_grad_clip_and_every_reader_copes(tmp_path, compose_cfg):
    _train(compose_cfg, tmp_path, "trainer.epochs=1")
    _train(compose_cfg, tmp_path, "trainer.epochs=2", "trainer.grad_clip=1.0",
           "trainer.resume=true")
    curves = tmp_path / "run" / "curves.png"
    curves.unlink()
    _train(compose_cfg, tmp_path, "trainer.epochs=3", "trainer.grad_clip=null",
           "trainer.resume=true")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    filled = [bool(r["train_grad_norm"]) for r in rows]
    assert filled == [False, True, False]  # logged from epoch 2, dropped at 3
    assert curves.is_file()  # drawn from the rows with their empty cell
    _, table = build_table([tmp_path / "run"])
    assert table[0]["epochs"] == 3


def test_a_cosine_schedule_refuses_a_new_length_on_resume(tmp_path, compose_cfg):
    cosine = ["lr_scheduler=cosine", "lr_scheduler.warmup_epochs=0"]
    _train(compose_cfg, tmp_path, "trainer.epochs=1", *cosine)
    with pytest.raises(UserError, match="lr_scheduler=cosine anneals") as e:
        _train(compose_cfg, tmp_path, "trainer.epochs=3", *cosine, "trainer.resume=true")
    assert "trainer.epochs=3" in str(e.value) and "\n" not in str(e.value)
    # the same length continues (here: nothing left to train)
    _train(compose_cfg, tmp_path, "trainer.epochs=1", *cosine, "trainer.resume=true")


def test_a_corrupt_tracker_store_on_resume_is_one_line_before_any_step(tmp_path, compose_cfg):
    pytest.importorskip("mlflow")
    _train(compose_cfg, tmp_path, "trainer.epochs=1", "logger=mlflow")
    store = tmp_path / "run" / "mlflow" / "mlflow.db"
    store.write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="logger=mlflow") as e:
        _train(compose_cfg, tmp_path, "trainer.epochs=2", "logger=mlflow",
               "trainer.resume=true")
    assert "\n" not in str(e.value)
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == ["1"]


def test_accumulating_two_batches_takes_the_step_of_one_twice_as_large(tmp_path):
    """trainer.accumulate=2 with batches of 16 sums the gradients of the two halves of the
    batch of 32 that accumulate=1 takes (same examples, same noise draws): the same
    weights, to rounding; schedules count optimizer steps, and an epoch that does not
    divide ends with a shorter group."""
    import torch
    from hostile import in_process

    base = ["dataset.n_train=128", "dataset.n_val=32", "dataset.n_test=32",
            "dataset.image_size=16", "model.hidden=[32]", "model.latent_dim=3",
            "trainer.epochs=2", "trainer.num_images=8", "trainer.pictures=false",
            "optim=sgd", "optim.lr=1e-4", f"dataset.root={tmp_path / 'data'}"]
    # SGD: its step scales with the gradient (Adam's would hide a sum taken for a mean)
    runs = {"one": ["trainer.batch_size=32"],
            "two": ["trainer.batch_size=16", "trainer.accumulate=2"],
            "odd": ["trainer.batch_size=16", "trainer.accumulate=3"]}
    state = {}
    for name, args in runs.items():
        in_process("train", *base, *args, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        state[name] = torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=True)
    a, b = state["one"]["model"], state["two"]["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert state["one"]["state"]["step"] == state["two"]["state"]["step"] == 8
    assert state["odd"]["state"]["step"] == 6  # 8 batches an epoch: groups of 3, 3, 2


def test_a_resumed_run_may_read_its_data_from_another_folder_but_not_other_data(
        tmp_path, compose_cfg):
    """dataset.root says where the files are, not what they are: a run moved to another
    machine continues with its data read from there; other data there (another size) is
    refused in one line, before any step."""
    from test_data import make_mnist

    for name, n in (("here", 60), ("there", 60), ("other", 70)):
        make_mnist(tmp_path / name, n_train=n)

    def run(root: str, epochs: int, *extra: str) -> None:
        overrides = ["dataset=mnist", f"dataset.root={tmp_path / root}", "dataset.val_size=12",
                     "dataset.download=false", "model.hidden=[16]", "model.latent_dim=2",
                     "trainer.batch_size=16", "trainer.device=cpu", "trainer.pictures=false",
                     f"trainer.epochs={epochs}", *extra]
        train(validate_train(compose_cfg(overrides)), tmp_path / "run", overrides)

    run("here", 1)
    run("there", 2, "trainer.resume=true")
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == ["1", "2"]
    with pytest.raises(UserError, match="a resumed run keeps its data") as e:
        run("other", 3, "trainer.resume=true")
    message = str(e.value)
    assert "58 training examples of shape [1, 28, 28], the run's had 48" in message
    assert "\n" not in message
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 2
