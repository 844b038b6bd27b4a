"""logger=mlflow."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from vae_cli.errors import UserError, one_line
from vae_cli.reports.trackers.base import (
    Status,
    Tracker,
    config_yaml,
    flatten,
    need,
    run_label,
)

log = logging.getLogger(__name__)


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
        if not str(experiment).strip():  # MLflow would fail later, on a None experiment
            raise UserError(f"logger.experiment={experiment!r} must be a name")
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
            raise UserError(f"logger=mlflow: {one_line(e)}") from None
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
