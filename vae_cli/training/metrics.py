"""metrics.csv: one row per epoch, no wall time in it (same seed, same file)."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLog:
    """Appends rows; on resume it continues the file with the columns it already has."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] | None = None
        if path.exists():
            with path.open() as f:
                self.columns = next(csv.reader(f), None)

    def append(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
