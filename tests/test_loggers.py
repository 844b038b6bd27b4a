"""Experiment trackers (logger=): each runs for real, offline, on a tiny run, and what it
wrote is read back with the tracker's own reader and compared with metrics.csv."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_cli import TINY, rows

from vae_cli.commands.train import train
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.reports.training import metric_name
from vae_cli.training.recipe import setup

STEPS = 8  # 256 examples / batch 32: steps per epoch
LOG = "trainer.log_every=2"  # the running loss every 2 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")  # shapes rendered once for the module


def run_in_process(compose, tmp_path: Path, *overrides: str, run: str = "run",
                   data: Path | None = None) -> Path:
    """`vae train` after Hydra: the command's own function, resumes included."""
    args = [*TINY, f"dataset.root={data or tmp_path / 'data'}", LOG, *overrides]
    train(validate_train(compose(args)), tmp_path / run, args)
    return tmp_path / run


def csv_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as tracker metrics: name -> [(step, value)] per epoch."""
    table = rows(run)
    return {metric_name(k): [(int(r["step"]), float(r[k])) for r in table]
            for k in table[0] if k != "step"}


def same(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """metrics.csv keeps 6 significant digits; a tracker keeps the float."""
    return ([s for s, _ in logged] == [s for s, _ in expected]
            and all(v == pytest.approx(e, rel=1e-5) for (_, v), (_, e) in zip(
                logged, expected, strict=True)))


def test_tensorboard_writes_every_metric_picture_and_the_config(compose_cfg, tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_in_process(compose_cfg, tmp_path, "logger=tensorboard", data=data)
    events = EventAccumulator(str(run / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    expected = csv_series(run)
    assert {"train/loss", "val/loss", "val/bpd", "epoch"} <= set(expected)
    assert set(events.Tags()["scalars"]) == {*expected, "train/loss_step"}
    for name, series in expected.items():
        assert same([(e.step, e.value) for e in events.Scalars(name)], series), name
    assert [e.step for e in events.Scalars("train/loss_step")] == list(range(2, 17, 2))
    for name in ("reconstructions", "samples"):
        assert [e.step for e in events.Images(name)] == [STEPS, 2 * STEPS], name
    final = {"final/reconstructions", "final/interpolations", "final/traversals",
             "final/latent_scatter", "final/curves"}
    assert final <= set(events.Tags()["images"])
    (config,) = events.Tensors("config/text_summary")
    assert b"latent_dim: 4" in config.tensor_proto.string_val[0]


def mlflow_client(run: Path):
    from mlflow import MlflowClient

    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    return MlflowClient(f"sqlite:///{run / 'mlflow/mlflow.db'}"), run_id


def test_mlflow_started_on_a_resume_gets_the_history_and_the_next_resume_appends(
        compose_cfg, tmp_path, monkeypatch, data):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = run_in_process(compose_cfg, tmp_path, "trainer.epochs=1", data=data)  # csv only
    last = f"ckpt={run / 'checkpoints/last.pt'}"
    run_in_process(compose_cfg, tmp_path, last, "trainer.epochs=2", "logger=mlflow",
                   data=data)
    client, run_id = mlflow_client(run)
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [8, 16]
    run_in_process(compose_cfg, tmp_path, last, "trainer.epochs=3", data=data)
    client, resumed_id = mlflow_client(run)
    assert resumed_id == run_id
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == run.name
    experiment = client.get_experiment_by_name("vae")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    params = logged.data.params
    assert params["model.latent_dim"] == "4" and params["model.hidden"] == "[64]"
    assert params["trainer.epochs"] == "2"  # MLflow keeps the first start's params
    assert params["logger._target_"] == "vae_cli.reports.trackers.MLflow"
    expected = csv_series(run)
    assert len(expected["train/loss"]) == 3
    assert set(logged.data.metrics) == {*expected, "train/loss_step"}
    for name, series in expected.items():
        history = client.get_metric_history(run_id, name)
        assert same(sorted((m.step, m.value) for m in history), series), name
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss_step"))
    assert steps == list(range(10, 25, 2))  # from the start of the tracking
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "checkpoints", "images", "curves.png", "reconstructions.png",
            "interpolations.png", "traversals.png", "latent_scatter.png"} <= top
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml",
                                                           str(tmp_path))).read_text())
    assert config["trainer"]["epochs"] == 3  # the latest start's config
    assert {a.path for a in client.list_artifacts(run_id, "images")} == {
        f"images/{kind}_00{e}.png" for kind in ("reconstructions", "samples") for e in (2, 3)}
    saved = client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path / "dl"))
    assert Path(saved).read_bytes() == (run / "checkpoints/best.pt").read_bytes()
    # A corrupt store on the next resume: one line before any step, the run left as it was.
    (run / "mlflow/mlflow.db").write_bytes(b"not a database" * 100)
    before = (run / "metrics.csv").read_bytes()
    with pytest.raises(UserError, match=r"^logger=mlflow: .*not a database") as e:
        run_in_process(compose_cfg, tmp_path, last, "trainer.epochs=4", data=data)
    assert "\n" not in str(e.value) and (run / "metrics.csv").read_bytes() == before


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's own protobuf messages in its LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of chunks: crc32, length, type; 1 full, 2 first,
    3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_history(records) -> dict[str, list[tuple[int, object]]]:
    """name -> [(step, value)]; an image's value is its description (a dict)."""
    history: dict[str, list[tuple[int, object]]] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in r.history.item:
            key, *inner = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            if inner:
                row.setdefault(key, {})[inner[0]] = value
            else:
                row[key] = value
        for key, value in row.items():
            history.setdefault(key, []).append((row["_step"], value))
    return history


def test_wandb_offline_run_holds_config_metrics_pictures_and_checkpoint(compose_cfg, tmp_path,
                                                                        monkeypatch, data):
    import wandb

    home_config = Path.home() / ".config" / "wandb"
    before = home_config.exists()
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       **{f"WANDB_{k}_DIR": str(tmp_path / "wandb" / k.lower())
                          for k in ("CACHE", "CONFIG", "DATA")}}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        run = run_in_process(compose_cfg, tmp_path, "logger=wandb", data=data)
        assert wandb.run is None  # the tool finished its run, not an exit hook
    finally:
        wandb.teardown()  # and this process's wandb service
    (folder,) = (run / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    records = list(wandb_records(log))
    kinds = {r.WhichOneof("record_type"): r for r in records}
    config = {u.key: json.loads(u.value_json) for u in kinds["run"].run.config.update}
    assert config["model"]["latent_dim"] == 4 and config["logger"]["mode"] == "offline"
    assert kinds["run"].run.run_id == json.loads((run / "trackers.json").read_text()
                                                 )["wandb"]["id"]
    history = wandb_history(records)
    for name, series in csv_series(run).items():
        assert same(history[name], series), name
    assert [s for s, _ in history["train/loss_step"]] == list(range(2, 17, 2))
    for name in ("reconstructions", "samples"):
        assert [s for s, _ in history[name]] == [STEPS, 2 * STEPS], name
    assert len(list((folder / "files/media/images").glob("reconstructions_*.png"))) == 2
    assert "final/curves" in history
    (entry,) = kinds["artifact"].artifact.manifest.contents
    digest = base64.b64encode(hashlib.md5((run / "checkpoints/best.pt").read_bytes())
                              .digest()).decode()
    assert kinds["artifact"].artifact.type == "model" and entry.path == "best.pt"
    assert entry.digest == digest
    assert kinds["exit"].exit.exit_code == 0
    assert home_config.exists() == before  # nothing outside the test's folders


@pytest.mark.parametrize("option, module", [
    ("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_stops_before_any_work(compose_cfg, tmp_path, monkeypatch,
                                                  option, module):
    # None in sys.modules: `import <module>` raises ImportError, as when it is absent
    monkeypatch.setitem(sys.modules, module, None)
    cfg = validate_train(compose_cfg([*TINY, f"logger={option}"]))
    package = "tensorboard" if option == "tensorboard" else option
    with pytest.raises(UserError) as e:
        setup(cfg, tmp_path / "run")
    assert str(e.value) == (f"logger={option} needs the {package} package: "
                            f"pip install 'vae-cli[{option}]'")
    assert not (tmp_path / "run").exists()


def test_a_missing_package_is_one_line_from_the_command(tmp_path):
    code = ("import sys; sys.modules['mlflow'] = None; from vae_cli.commands.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", *TINY, "logger=mlflow",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: logger=mlflow needs the mlflow package: pip install 'vae-cli[mlflow]'"]
    assert not (tmp_path / "run/checkpoints").exists()


def test_an_empty_mlflow_experiment_name_stops_before_any_work(compose_cfg, tmp_path):
    cfg = validate_train(compose_cfg([*TINY, "logger=mlflow", "logger.experiment=' '"]))
    with pytest.raises(UserError, match="logger.experiment=' ' must be a name"):
        setup(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
