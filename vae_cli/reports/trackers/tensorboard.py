"""logger=tensorboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vae_cli.errors import UserError
from vae_cli.reports.trackers.base import (
    Status,
    Tracker,
    config_yaml,
    indent,
    need,
)
from vae_cli.runtime.files import unwritable


class TensorBoard(Tracker):
    """logger=tensorboard: scalars, picture grids, text and the config (as text) in event
    files under ``log_dir`` (default <run>/tensorboard). TensorBoard keeps no files, so the
    checkpoint stays in the run folder only."""

    option = "tensorboard"

    def __init__(self, log_dir: str | None = None):
        if log_dir and (reason := unwritable(log_dir)):
            raise UserError(f"logger.log_dir={log_dir} cannot be written ({reason})")
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
