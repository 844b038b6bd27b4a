"""The optimizer a config names (torch.optim's, allow-listed), and the ones beyond
torch.optim that published recipes need."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_cli.config.components import instantiate
from vae_cli.config.registry import locate


class NormalizedAdam(torch.optim.Adam):
    """Adam on gradients rescaled to unit L2 norm per parameter tensor, g / (||g|| + 1e-7):
    the optimizer of the VampPrior paper's code (Tomczak & Welling 2018), which trains its
    published models with it. The normalised gradient is what Adam's moments see."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            torch._foreach_div_(grads, torch._foreach_add(norms, 1e-7))
        super().step()
        return loss


def optimizer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer's hyperparameters from its config (betas as the tuple torch keeps)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k != "_target_"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def build_optimizer(cfg: DictConfig, params: list, compiled: bool = True,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """A torch.optim optimizer named by ``optim._target_`` (allow-listed to torch.optim).

    For an eager step (``compiled=False``), torch's one-kernel update where the optimizer,
    the device and this torch have one: the per-tensor loop it replaces took a quarter of a
    small MLP's eager CPU step; same maths. A compiled step fuses the loop itself.
    ``capturable``: its state on the device, for a step captured in a CUDA graph (where
    the optimizer has the option; SGD keeps no step count and needs none)."""
    settings = optimizer_settings(cfg)
    if capturable and "capturable" in inspect.signature(
            locate("optim", cfg._target_)).parameters:
        settings["capturable"] = True
    node = OmegaConf.create({"_target_": cfg._target_, **settings})
    if not compiled:  # torch's own range checks (momentum < 0...): instantiate's one line
        with contextlib.suppress(RuntimeError):  # no fused kernel for these parameters
            return instantiate("optim", node, params, fused=True)
    return instantiate("optim", node, params)
