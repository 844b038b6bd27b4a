"""Experiment trackers, the ``logger=`` group: where a run's resolved config, metrics,
picture grids and final checkpoint go besides its own folder.

``logger=csv`` is the base class and adds nothing: metrics.csv is written by the trainer
whatever the tracker. Each other tracker imports its package when it is built (before any
work, so a missing package is one line naming the extra) and never otherwise, so a run
without it does not pay for the import. Only rank 0 builds one (training/recipe.py).

A tracker's own run id is kept in the run folder (trackers.json), not in the checkpoint:
the run folder is what a resume continues, a checkpoint copied elsewhere starts a new run
folder and so a new tracker run, and checkpoints stay byte-identical with or without one.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from vae_cli.errors import UserError
from vae_cli.runtime.files import write_text

log = logging.getLogger(__name__)

STATE = "trackers.json"
Status = Literal["finished", "interrupted", "failed"]


def need(module: str, option: str, package: str | None = None) -> Any:
    """``module`` imported, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"logger={option} needs the {package or module} package: "
                        f"pip install 'vae-cli[{option}]'") from None


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config as the rows of a flat table."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_yaml(config: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))


def run_label(run_dir: Path) -> str:
    """A run's name in a tracker: its folder as typed from the working directory
    (outputs/<date>/<time>), else the folder's name."""
    try:
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return run_dir.name


class Tracker:
    """logger=csv: metrics.csv only, which the trainer writes whatever the tracker. The
    interface every tracker implements: ``start`` once before the first step, the ``log_*``
    calls from rank 0's reports (reports/training.py), ``close`` however the run ended."""

    option = "csv"
    run_dir: Path = Path(".")

    def start(self, config: dict, run_dir: Path, resumed_at: int | None) -> bool:
        """``config`` resolved; ``resumed_at`` is the step a resumed run continues from,
        None for a new run. True when this continues a tracker run that holds the earlier
        epochs; False when it starts one (the reports then send it the earlier epochs)."""
        self.run_dir = run_dir
        return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Numbers at a global optimizer step (train/loss, val/bpd, ...)."""

    def log_image(self, name: str, path: Path, step: int) -> None:
        """A picture just written to ``path`` (a grid of the series ``name``)."""

    def log_text(self, name: str, path: Path, step: int) -> None:
        """A text file just written to ``path`` (what a sequence model shows instead)."""

    def log_artifact(self, path: Path) -> None:
        """A file kept with the tracker's run (the final checkpoint)."""

    def close(self, status: Status) -> None:
        """The run ended: finished, interrupted (resumable) or failed."""

    def saved(self) -> dict:
        """What this tracker kept in trackers.json (its run id), or {}."""
        try:
            entry = json.loads((self.run_dir / STATE).read_text()).get(self.option)
        except (OSError, ValueError, AttributeError):
            return {}
        return entry if isinstance(entry, dict) else {}

    def save(self, entry: dict) -> None:
        path = self.run_dir / STATE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        state = state if isinstance(state, dict) else {}
        write_text(path, json.dumps({**state, self.option: entry}, indent=1) + "\n")

    def relative(self, path: Path) -> str | None:
        """Where ``path`` sits in the run folder (images, checkpoints), None at its top."""
        try:
            parent = path.resolve().parent.relative_to(self.run_dir.resolve())
        except ValueError:
            return None
        return parent.as_posix() if parent.parts else None


class TensorBoard(Tracker):
    """logger=tensorboard: scalars, picture grids, text and the config (as text) in event
    files under ``log_dir`` (default <run>/tensorboard). TensorBoard keeps no files, so the
    checkpoint stays in the run folder only."""

    option = "tensorboard"

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.board = need("torch.utils.tensorboard", self.option, "tensorboard")
        self.writer: Any = None

    def start(self, config: dict, run_dir: Path, resumed_at: int | None) -> bool:
        super().start(config, run_dir, resumed_at)
        folder = Path(self.log_dir) if self.log_dir else run_dir / "tensorboard"
        continued = resumed_at is not None and any(folder.glob("events.out.tfevents.*"))
        # On a resume, events a killed process wrote after the checkpoint's step are
        # hidden, so each step keeps one value.
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = self.board.SummaryWriter(str(folder), purge_step=purge)
        self.writer.add_text("config", indent(config_yaml(config)), resumed_at or 0)
        return continued

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, name: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self.writer.add_image(name, pixels, step, dataformats="HWC")
        self.writer.flush()

    def log_text(self, name: str, path: Path, step: int) -> None:
        self.writer.add_text(name, indent(path.read_text()), step)

    def close(self, status: Status) -> None:
        if self.writer is not None:
            self.writer.close()


def indent(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown: a code block."""
    return "\n".join(f"    {line}" for line in text.splitlines())


class MLflow(Tracker):
    """logger=mlflow: the config as params (dotted keys) and config.yaml, every metric with
    its step, the pictures and the final checkpoint as artifacts. ``tracking_uri`` null:
    $MLFLOW_TRACKING_URI when set, else a store inside the run folder
    (sqlite <run>/mlflow/mlflow.db, artifacts under <run>/mlflow/artifacts)."""

    option = "mlflow"
    STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, tracking_uri: str | None = None, experiment: str = "vae",
                 run_name: str | None = None, tags: dict[str, str] | None = None):
        self.mlflow = need("mlflow", self.option)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.experiment, self.run_name = experiment, run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if self.tracking_uri is None:  # the default SQLite store: not in mlflow-skinny
            need("sqlalchemy", self.option)
            need("alembic", self.option)
        self.client: Any = None
        self.run_id = ""

    def start(self, config: dict, run_dir: Path, resumed_at: int | None) -> bool:
        super().start(config, run_dir, resumed_at)
        for name in ("mlflow", "alembic"):  # store set-up chatter stays out of train.log
            logging.getLogger(name).setLevel(logging.WARNING)
        error = self.mlflow.exceptions.MlflowException
        try:
            with warnings.catch_warnings():  # MLflow's own use of SQLAlchemy, not ours
                warnings.simplefilter("ignore", DeprecationWarning)
                self.client = self.mlflow.MlflowClient(self.store_uri())
            run = self.continued() if resumed_at is not None else None
            continued = run is not None
            if run is None:
                run = self.client.create_run(self.experiment_id(), run_name=self.run_name
                                             or run_label(run_dir),
                                             tags={"run_dir": str(run_dir.resolve()),
                                                   **self.tags})
            self.run_id = run.info.run_id
            self.save({"run_id": self.run_id})
            self.log_config(config, run.data.params)
        except error as e:
            raise UserError(f"logger=mlflow: {str(e).splitlines()[0][:300]}") from None
        return continued

    def store_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        folder = self.run_dir.resolve() / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        # the run folder's own store keeps its artifacts beside it, not in the cwd
        where = None if self.tracking_uri else (self.run_dir.resolve() / "mlflow/artifacts"
                                                ).as_uri()
        try:
            return self.client.create_experiment(self.experiment, artifact_location=where)
        except self.mlflow.exceptions.MlflowException:  # another job created it meanwhile
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def continued(self) -> Any:
        """The run a resumed run continues (its id kept in the run folder), or None."""
        run_id = self.saved().get("run_id")
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except self.mlflow.exceptions.MlflowException:
            log.warning("mlflow run %s is not in %s; starting a new one", run_id,
                        self.store_uri())
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run

    def log_config(self, config: dict, logged: dict[str, str]) -> None:
        """Params once (MLflow's params never change): a resume adds only new keys; the
        config.yaml artifact is the latest start's config."""
        from mlflow.entities import Param

        flat = {k: json.dumps(v) if isinstance(v, list | dict) else str(v)
                for k, v in flatten(config).items()}
        changed = sorted(k for k in flat if k in logged and logged[k] != flat[k][:500])
        if changed:
            log.info("mlflow keeps the first start's params; changed now: %s",
                     ", ".join(changed))
        params = [Param(k, v[:500]) for k, v in flat.items() if k not in logged]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_text(self.run_id, config_yaml(config), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.log_artifact(path)

    def log_text(self, name: str, path: Path, step: int) -> None:
        self.log_artifact(path)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), self.relative(path))

    def close(self, status: Status) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=self.STATUS[status])


class WandB(Tracker):
    """logger=wandb: the config, every metric at its step, the pictures as images and the
    final checkpoint as a model artifact. ``mode=offline`` (the default) writes under
    <dir>/wandb (dir: the run folder) and sends nothing; ``wandb sync <that folder>``
    uploads it later, ``logger.mode=online`` sends as it goes (after ``wandb login``)."""

    option = "wandb"

    def __init__(self, project: str = "vae", entity: str | None = None,
                 mode: Literal["offline", "online"] = "offline", dir: str | None = None,
                 name: str | None = None, tags: list[str] | None = None):
        self.wandb = need("wandb", self.option)
        self.project, self.entity, self.mode, self.dir = project, entity, mode, dir
        self.name, self.tags = name, list(tags or [])
        self.run: Any = None

    def start(self, config: dict, run_dir: Path, resumed_at: int | None) -> bool:
        super().start(config, run_dir, resumed_at)
        run_id = self.saved().get("id") if resumed_at is not None else None
        folder = Path(self.dir) if self.dir else run_dir
        folder.mkdir(parents=True, exist_ok=True)
        try:
            # console="off": wandb leaves the tool's stdout/stderr alone (one-line errors)
            self.run = self.wandb.init(
                project=self.project, entity=self.entity, mode=self.mode, dir=str(folder),
                name=self.name or run_label(run_dir), tags=self.tags or None,
                config=None if run_id else config, id=run_id,
                resume="allow" if run_id else None,
                settings=self.wandb.Settings(console="off"))
        except self.wandb.errors.Error as e:
            raise UserError(f"logger=wandb: {str(e).splitlines()[0][:300]}") from None
        if run_id:  # a resumed run keeps its id; its config is the latest start's
            self.run.config.update(config, allow_val_change=True)
        self.save({"id": self.run.id})
        return run_id is not None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def log_text(self, name: str, path: Path, step: int) -> None:
        page = f"<pre>{html.escape(path.read_text())}</pre>"
        self.run.log({name: self.wandb.Html(page)}, step=step)

    def log_artifact(self, path: Path) -> None:
        artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model")
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, status: Status) -> None:
        # finish() also ends wandb's background service process
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "finished" else 1)
