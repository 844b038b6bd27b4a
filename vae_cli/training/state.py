"""What must survive a restart besides weights and optimizer moments: counters and, when a
signal stopped an epoch half way, where that epoch stands."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class EpochProgress:
    """A stopped epoch: its batch order, the next batch, and the metric sums so far
    (averaged over ranks, so a resume on any number of processes adds to them)."""

    order: torch.Tensor  # the batch-order generator's state at the epoch's start
    batch: int
    names: list[str]
    sums: torch.Tensor


@dataclass
class TrainState:
    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    best_val: float = math.inf
    best_epoch: int = 0  # the epoch whose checkpoint best.pt holds
    bad_epochs: int = 0  # epochs since the validation loss last improved
    # metrics.csv's rows: the checkpoint carries them, so the file can always be rewritten
    # to match the weights, whenever the process was killed
    rows: list[dict] = dataclasses.field(default_factory=list)
    progress: EpochProgress | None = None

    def to_dict(self) -> dict:
        """Plain values for a checkpoint (loads with weights_only)."""
        out = {k: getattr(self, k) for k in ("epoch", "step", "best_val", "best_epoch",
                                             "bad_epochs")}
        out["rows"] = [dict(r) for r in self.rows]
        if self.progress is not None:
            out["progress"] = dataclasses.asdict(self.progress)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """The counters of a checkpoint, checked: a file is read as possibly hostile, and a
        wrong counter would retrain, skip or misreport epochs silently (ValueError)."""
        progress = d.get("progress")
        state = cls(epoch=d["epoch"], step=d["step"], best_val=d["best_val"],
                    best_epoch=d.get("best_epoch", 0), bad_epochs=d["bad_epochs"],
                    rows=d.get("rows", []),
                    progress=EpochProgress(**progress) if progress else None)
        problem = state.problem()
        if problem:
            raise ValueError(problem)
        return state

    def problem(self) -> str | None:
        """What makes these counters impossible, or None."""
        counts = {k: getattr(self, k) for k in ("epoch", "step", "best_epoch", "bad_epochs")}
        for key, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                return f"state.{key}={n!r} is not a count"
        if self.best_epoch > self.epoch:
            return f"state.best_epoch={self.best_epoch} lies past state.epoch={self.epoch}"
        if isinstance(self.best_val, bool) or not isinstance(self.best_val, int | float) \
                or math.isnan(self.best_val):
            return f"state.best_val={self.best_val!r} is not a loss"
        return _rows_problem(self.rows, self.epoch) or _progress_problem(self.progress)


def _rows_problem(rows: object, epoch: int) -> str | None:
    """metrics.csv's rows: one per finished epoch, in order (none in a checkpoint from
    before rows were kept), each a mapping of names to plain values."""
    if not isinstance(rows, list) or len(rows) not in (0, epoch):
        return f"state.rows is not a list of {epoch} metrics rows"
    for i, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and row.get("epoch") in (i, str(i)) and "step" in row
                and all(isinstance(k, str) and (v is None or isinstance(v, int | float | str))
                        for k, v in row.items())):
            return f"state.rows[{i - 1}] is not epoch {i}'s metrics row"
    return None


def _progress_problem(p: EpochProgress | None) -> str | None:
    if p is None:
        return None
    if not (isinstance(p.batch, int) and p.batch >= 0 and isinstance(p.order, torch.Tensor)
            and isinstance(p.names, list) and all(isinstance(n, str) for n in p.names)
            and isinstance(p.sums, torch.Tensor) and p.sums.shape == (len(p.names),)):
        return "state.progress is not a stopped epoch's position"
    return None
