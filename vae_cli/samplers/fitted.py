"""A post-hoc sampler fitted to a checkpoint's training codes, once: saved beside the
checkpoint (<run>/samplers/<sampler>_<checkpoint name>.pt) with what it was fitted on, and
reused while the same checkpoint asks with the same settings; refitted when either differs.

The file is read as data and checked like a checkpoint someone sent: weights_only loading,
a format marker, the keys and types of its fields, a state of exactly the sampler's tensors
with finite, valid values. A file that fails any check is refused with one line (never
silently refitted over: someone changed it). What is built never comes from the file: the
sampler is the one the command line chose; the file only supplies its fitted tensors.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from vae_cli.data.base import Splits
from vae_cli.errors import UserError, one_line
from vae_cli.evaluation.diagnostics import encode_all
from vae_cli.objective.model import VAE
from vae_cli.runtime.files import save_cache
from vae_cli.runtime.run_folder import RunFolder
from vae_cli.samplers.base import Sampler

log = logging.getLogger(__name__)

FORMAT = "vae_cli.sampler/1"


def checkpoint_identity(path: str | Path, ckpt: dict) -> dict[str, Any]:
    """What a fitted sampler was fitted on: the checkpoint's path, the SHA-256 of its bytes
    (what decides a match: a copy elsewhere is the same model), its epoch and step."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    state = ckpt.get("state") or {}
    return {"path": str(Path(path).resolve()), "sha256": h.hexdigest(),
            "epoch": state.get("epoch"), "step": state.get("step")}


def sampler_path(folder: Path, sampler: Sampler, ckpt_path: str | Path) -> Path:
    """best.pt and last.pt of one run each keep their own fitted sampler."""
    return RunFolder(Path(folder)).samplers / f"{sampler.name}_{Path(ckpt_path).stem}.pt"


def fitted_sampler(sampler: Sampler, settings: dict, model: VAE, data: Splits | None,
                   ckpt_path: str | Path, ckpt: dict, folder: Path,
                   batch_size: int = 500) -> str:
    """Fit ``sampler`` (built from ``settings``, its plain config) to the training split's
    codes, or load the fit saved for this checkpoint and these settings. Returns "reused",
    "fitted" or "prior" (nothing to fit)."""
    if not sampler.needs_fit:
        return "prior"
    identity = checkpoint_identity(ckpt_path, ckpt)
    path = sampler_path(folder, sampler, ckpt_path)
    saved = read(path, sampler)
    if saved is not None:
        same = (saved["checkpoint"]["sha256"] == identity["sha256"]
                and saved["settings"] == settings)
        if same:
            load_state(path, sampler, saved["state"])
            log.info("sampler=%s: reusing %s", sampler.name, path)
            return "reused"
        log.info("sampler=%s: %s was fitted to another checkpoint or other settings; "
                 "refitting", sampler.name, path)
    if data is None:
        raise UserError(f"sampler={sampler.name} is fitted to the training split, and its "
                        "data cannot be loaded")
    labels = data.labels_for("train", model.conditional)
    mu, std = encode_all(model, data.train, batch_size, labels)
    log.info("sampler=%s: fitting to %d training codes", sampler.name, len(mu))
    sampler.fit(mu, std)
    write(path, {"format": FORMAT, "sampler": sampler.name, "checkpoint": identity,
                 "settings": settings, "seed": settings.get("seed"), "codes": len(mu),
                 "state": {k: v.detach().cpu() for k, v in sampler.state_dict().items()}})
    return "fitted"


def read(path: Path, sampler: Sampler) -> dict | None:
    """A saved sampler's fields, checked; None when there is no file."""
    if not path.is_file():
        return None

    def refuse(reason: str) -> UserError:
        return UserError(f"{path} is not a usable {sampler.name} sampler file ({reason}); "
                         "delete it to refit")

    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; we refuse them anyway
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse a foreign file means "refuse"
        raise refuse(one_line(e)) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise refuse(f"no {FORMAT!r} marker")
    if saved.get("sampler") != sampler.name:
        raise refuse(f"it holds sampler {saved.get('sampler')!r}")
    ident = saved.get("checkpoint")
    if not (isinstance(ident, dict) and isinstance(ident.get("sha256"), str)):
        raise refuse("no checkpoint identity")
    if not isinstance(saved.get("settings"), dict):
        raise refuse("its settings are not a mapping")
    state = saved.get("state")
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise refuse("its state is not a mapping of tensors")
    return saved


def load_state(path: Path, sampler: Sampler, state: dict) -> None:
    """The saved tensors into the sampler: exactly its keys and shapes, valid values."""
    backup = {k: v.clone() for k, v in sampler.state_dict().items()}
    try:
        sampler.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit sampler {sampler.name}'s settings "
                        f"({one_line(e, chain=True)}); delete it to refit") from None
    problem = sampler.problem()
    if problem:
        sampler.load_state_dict(backup)
        raise UserError(f"{path} is not a usable {sampler.name} sampler file ({problem}); "
                        "delete it to refit")


def write(path: Path, payload: dict) -> None:
    """Atomically; a folder that cannot be written only costs the reuse."""
    save_cache(path, payload, "the fitted sampler", "it is refitted next time")
