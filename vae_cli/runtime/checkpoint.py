"""Checkpoints: atomic save, safe load (weights_only), and refusal of foreign files."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vae_cli.config.components import check_targets
from vae_cli.errors import UserError

FORMAT = "vae_cli.runtime.checkpoint/1"


@contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A file handle whose content becomes ``path`` only once complete: temp file in the same
    folder, fsync, os.replace. A reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path: Path, payload: dict[str, Any]) -> None:
    with _atomic(path) as f:
        torch.save({"format": FORMAT, **payload}, f)


def copy(src: Path, dst: Path) -> None:
    """dst becomes a byte copy of src (best.pt from the just-written last.pt), atomically."""
    with _atomic(dst) as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def load(path: str | Path | None) -> dict[str, Any]:
    """Load a checkpoint of ours without running any code from the file."""
    if not path:
        raise UserError("no checkpoint given; pass ckpt=outputs/<run>/checkpoints/best.pt")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=<run>/checkpoints/best.pt")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; we refuse them anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse a foreign file means "refuse"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path} is not a readable vae checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a vae checkpoint (no {FORMAT!r} marker)")
    for key in ("config", "model"):
        if key not in ckpt:
            raise UserError(f"{path} is an incomplete vae checkpoint (no {key!r})")
    check_targets(ckpt["config"], "checkpoint config")
    return ckpt


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run folder a checkpoint belongs to: <run>/checkpoints/x.pt -> <run>."""
    p = Path(ckpt_path).resolve().parent
    return p.parent if p.name == "checkpoints" else p
