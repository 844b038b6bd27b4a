"""Checkpoints: atomic save, safe load (weights_only), and refusal of foreign files.

What a checkpoint's config may build is checked by its reader (config.build), before
anything is built from it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_cli.errors import UserError
from vae_cli.runtime.files import atomic_write

FORMAT = "vae_cli.checkpoint/1"


def save(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, **payload}, f)


def copy(src: Path, dst: Path) -> None:
    """dst becomes a byte copy of src (best.pt from the just-written last.pt), atomically."""
    with atomic_write(dst) as f, open(src, "rb") as s:
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
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"{path} holds no config mapping")
    return ckpt


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run folder a checkpoint belongs to: <run>/checkpoints/x.pt -> <run>."""
    p = Path(ckpt_path).resolve().parent
    return p.parent if p.name == "checkpoints" else p
