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
        progress = d.get("progress")
        return cls(epoch=d["epoch"], step=d["step"], best_val=d["best_val"],
                   best_epoch=d.get("best_epoch", 0), bad_epochs=d["bad_epochs"],
                   rows=list(d.get("rows", [])),
                   progress=EpochProgress(**progress) if progress else None)
