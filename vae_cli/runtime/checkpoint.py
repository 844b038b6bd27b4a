"""Checkpoints: atomic save, safe load (weights_only), and refusal of foreign files.

What a checkpoint's config may build is checked by its reader (config.build), before
anything is built from it.
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_cli.errors import UserError, one_line
from vae_cli.runtime.files import atomic_write

FORMAT = "vae_cli.checkpoint/1"


def save(path: Path, payload: dict[str, Any]) -> None:
    """Serialised in memory first, so that a full disk surfaces as an OSError of our own
    write (not torch's C++ text) and the previous file stays intact."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    with atomic_write(path, make_parents=False) as f:
        f.write(buf.getbuffer())


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
        what = "is a folder" if path.is_dir() else "is a link to no file" \
            if path.is_symlink() else "does not exist"
        raise UserError(f"checkpoint {path} {what}; pass ckpt=<run>/checkpoints/best.pt")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; we refuse them anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse a foreign file means "refuse"
        reason = one_line(e)
        raise UserError(f"{path} is not a readable vae checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a vae checkpoint (no {FORMAT!r} marker)")
    problem = _malformed(ckpt)
    if problem:
        raise UserError(f"{path} is a damaged vae checkpoint ({problem})")
    return ckpt


def _malformed(ckpt: dict) -> str | None:
    """What is wrong with the layout of a loaded checkpoint, or None."""
    for key in ("config", "model"):
        if key not in ckpt:
            return f"no {key!r}"
    if not isinstance(ckpt["config"], dict):
        return "its config is not a mapping"
    for key in ("model", "ema"):
        weights = ckpt.get(key, {}) if key == "ema" else ckpt[key]
        if weights is not None and not (isinstance(weights, dict) and all(
                isinstance(v, torch.Tensor) for v in weights.values())):
            return f"its {'weights' if key == 'model' else 'averaged weights'} are not a " \
                   "mapping of tensors"
    shape = ckpt.get("shape")
    if not (isinstance(shape, list) and len(shape) in (1, 3)
            and all(isinstance(n, int) and n > 0 for n in shape)):
        return f"data shape {shape!r}"
    problem = _dataset_disagrees(ckpt["config"].get("dataset"), shape)
    if problem:
        return problem
    size = ckpt.get("dataset_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"dataset size {size!r}"
    classes = ckpt.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                or classes < 1):
        return f"number of classes {classes!r}"
    vocab = ckpt.get("vocab")
    if vocab is not None and not (isinstance(vocab, dict) and isinstance(vocab.get("itos"), list)
                                  and all(isinstance(t, str) for t in vocab["itos"])
                                  and len(set(vocab["itos"])) == len(vocab["itos"])
                                  and isinstance(vocab.get("tokens"), str)):
        return "its vocabulary"
    for key in ("optim", "state", "rng", "divergence", "scaler", "lr_scheduler"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            return f"its {key!r} is not a mapping"
    aux = ckpt.get("aux_optim")  # a list of states (one mapping before there were several)
    if aux is not None and not isinstance(aux, dict) and not (
            isinstance(aux, list) and all(isinstance(a, dict) for a in aux)):
        return "its 'aux_optim' is not a list of mappings"
    return None


def _dataset_disagrees(node: Any, shape: list[int]) -> str | None:
    """The dataset node's size keys against the examples' shape: both were written by the
    same run, so a disagreement is an edit (and export would copy the node as it is)."""
    if not isinstance(node, dict) or len(shape) != 3:
        return None
    for key, want in (("channels", shape[0]), ("image_size", shape[1])):
        if key in node and (node[key] != want or shape[1] != shape[2]):
            return f"dataset.{key}={node[key]!r} but its examples are " \
                   f"{'x'.join(map(str, shape))}"
    return None

