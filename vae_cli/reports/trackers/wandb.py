"""logger=wandb."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Literal

from vae_cli.errors import UserError, one_line
from vae_cli.reports.trackers.base import (
    Status,
    Tracker,
    need,
    run_label,
)
from vae_cli.runtime.files import unwritable


class WandB(Tracker):
    """logger=wandb: the config, every metric at its step, the pictures as images and the
    final checkpoint as a model artifact. ``mode=offline`` (the default) writes under
    <dir>/wandb (dir: the run folder) and sends nothing; ``wandb sync <that folder>``
    uploads it later, ``logger.mode=online`` sends as it goes (after ``wandb login``)."""

    option = "wandb"

    def __init__(self, project: str = "vae", entity: str | None = None,
                 mode: Literal["offline", "online"] = "offline", dir: str | None = None,
                 name: str | None = None, tags: list[str] | None = None):
        if dir and (reason := unwritable(dir)):
            raise UserError(f"logger.dir={dir} cannot be written ({reason})")
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
            raise UserError(f"logger=wandb: {one_line(e)}") from None
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
