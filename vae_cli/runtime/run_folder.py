"""A run folder's layout, and the one reader and writer of each file in it.

    <run>/
      .hydra/            Hydra's record of the config and overrides of each start
      train.log          the log
      checkpoints/       last.pt (each epoch and each stop), best.pt (lowest validation loss)
      metrics.csv        one row per epoch (no wall time in it: same seed, same file)
      eval.json          `vae eval` on the test split (eval_<split>.json on another split)
      samplers/          samplers fitted to a checkpoint's codes (samplers/fitted.py)
      export/<format>/   `vae export`
      FAILED             a failed sweep job's message

Every reader of a file here that a person may have edited, truncated or replaced says so
with a ``RunFileError`` naming the file: a ``UserError``, so a command that cannot go on
without the file stops with that one line, and one that can (compare, a model card) skips it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import write_text

CHECKPOINTS = "checkpoints"
METRICS = "metrics.csv"
LOG = "train.log"
HYDRA = ".hydra"
FAILED = "FAILED"


class RunFileError(UserError):
    """A run's file that cannot be read as what it should be."""


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> RunFolder:
        """The run folder a checkpoint belongs to: <run>/checkpoints/x.pt -> <run>; a
        checkpoint kept anywhere else: the folder it sits in."""
        p = _real(ckpt_path).parent
        return cls(p.parent if p.name == CHECKPOINTS else p)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def failed(self) -> Path:
        return self.path / FAILED

    @property
    def overrides(self) -> Path:
        return self.path / HYDRA / "overrides.yaml"

    def eval_json(self, split: str = "test") -> Path:
        return self.path / ("eval.json" if split == "test" else f"eval_{split}.json")

    @property
    def samplers(self) -> Path:
        return self.path / "samplers"

    def export(self, fmt: str) -> Path:
        return self.path / "export" / fmt


def in_run_folder(ckpt_path: str | Path) -> bool:
    """Whether a checkpoint sits in a run folder's checkpoints/ (a resume writes back there)."""
    return _real(ckpt_path).parent.name == CHECKPOINTS


def _real(path: str | Path) -> Path:
    """The path with its links followed; a symlink loop stays as it is (Path.resolve raises
    there), for the checkpoint's reader to refuse in one line."""
    return Path(os.path.realpath(path))


def read_metrics(path: Path) -> list[dict[str, str]]:
    """metrics.csv's rows, values as written; [] when there is no file."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RunFileError(f"{path} is unreadable ({one_line(e)})") from None
    if rows and "epoch" not in rows[0]:
        raise RunFileError(f"{path} is unreadable (no epoch column: not a vae metrics.csv)")
    for line, row in enumerate(rows, start=2):  # csv fills a short row with None
        if None in row or None in row.values():
            raise RunFileError(f"{path} is unreadable (line {line} has another number of "
                               f"cells than the header's {len(rows[0]) - (None in rows[0])})")
        problem = _cell_problem(row)
        if problem:
            raise RunFileError(f"{path} is unreadable (line {line}: {problem})")
    return rows


def _cell_problem(row: dict[str, str]) -> str | None:
    """Why a row's cells are not what vae writes (an epoch count, then numbers or empty)."""
    if not row["epoch"].isdigit():
        return f"epoch={row['epoch']!r} is not an epoch count"
    for key, value in row.items():
        try:
            float(value or 0)  # an empty cell: a term this epoch did not log
        except ValueError:
            return f"{key}={value!r} is not a number"
    return None


def write_metrics(path: Path, rows: list[dict]) -> None:
    """The rows, whole and atomically: floats to 6 significant digits. The columns are every
    row's, in the order they first appear (a resume may add or drop a logged term, e.g.
    trainer.grad_clip's gradient norm): a row without one leaves its cell empty."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for row in rows:
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    write_text(path, buf.getvalue())


def write_eval(path: Path, result: dict[str, Any]) -> Path:
    """eval.json: valid JSON whatever the numbers (a non-finite one is written as null)."""
    return write_text(path, json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def read_eval(path: Path) -> dict[str, Any] | None:
    """eval.json's results; None when there is no file."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunFileError(f"{path} is unreadable ({one_line(e)})") from None
    if not isinstance(result, dict):
        raise RunFileError(f"{path} is unreadable (not a JSON object)")
    return result


def take_back(run_dir: Path, logged: int) -> None:
    """Undo what Hydra wrote for a start refused before any work: its config record, the
    lines it added to the log (all of it when ``logged`` is 0), folders made for it alone."""
    # this start's record: the newest .hydra/again-<time> beside a run's own, else .hydra
    # (hydra.output_subdir cannot say: it is resolved anew on each access)
    again = sorted((run_dir / HYDRA).glob("again-*"))
    if again:
        shutil.rmtree(again[-1], ignore_errors=True)
    elif not (run_dir / CHECKPOINTS).exists() and not (run_dir / METRICS).exists():
        shutil.rmtree(run_dir / HYDRA, ignore_errors=True)
    log_file = run_dir / LOG
    if log_file.is_file() and logged == 0:
        log_file.unlink()
    elif log_file.is_file():  # a refused resume's lines (the data it loaded, say)
        os.truncate(log_file, logged)
    for folder in (run_dir / HYDRA, run_dir):
        with suppress(OSError):  # only when nothing else is in it
            folder.rmdir()
