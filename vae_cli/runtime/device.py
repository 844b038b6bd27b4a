"""Devices and mixed precision."""

from __future__ import annotations

import contextlib

import torch

from vae_cli.errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available; use trainer.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("trainer.device=mps but MPS is not available; use trainer.device=cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Mixed precision context; fp32 is a no-op. Likelihoods cast back to fp32 themselves."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()  # entered every step: skip autocast's own bookkeeping
    return torch.autocast(device.type, dtype=dtype)
