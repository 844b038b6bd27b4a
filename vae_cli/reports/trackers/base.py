"""The tracker interface (logger=csv adds nothing) and what the trackers share."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Literal

from vae_cli.errors import UserError
from vae_cli.runtime.files import write_text

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


def indent(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown: a code block."""
    return "\n".join(f"    {line}" for line in text.splitlines())
