"""metrics.csv: one row per epoch, no wall time in it (same seed, same file).

The rows live in the training state (and so in every checkpoint); the file is rewritten
whole, atomically, from them. A process killed between saving a checkpoint and writing the
file leaves a file that the next start rewrites to match the checkpoint.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from vae_cli.runtime.files import write_text


def read_metrics(path: Path) -> list[dict]:
    """The rows of an existing file (for checkpoints written before rows were kept)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_metrics(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    write_text(path, buf.getvalue())
