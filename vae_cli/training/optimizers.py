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
from vae_cli.errors import UserError


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


def load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """The saved moments and settings, with this process's implementation choice (a run
    saved fused on one device may continue where that kernel is missing, or compiled)."""
    chosen = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g}
              for g in opt.param_groups]
    # the choice goes in before loading: torch places each step count by it (on the
    # weights' device for a fused or capturable update, a CPU run's continuing on a GPU)
    groups = [{**g, **keep} for g, keep in zip(saved["param_groups"], chosen, strict=True)]
    opt.load_state_dict({**saved, "param_groups": groups})
    check_moments(opt)
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # saved by a graph-safe run
            group["lr"] = float(group["lr"])


def check_moments(opt: torch.optim.Optimizer) -> None:
    """Every loaded state tensor is a scalar or has its parameter's shape (a factored one,
    Adafactor's, broadcasts to it): torch does not check, and a fused kernel given another
    shape reads past the tensor's end (ValueError)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for name, t in opt.state.get(p, {}).items():
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape == p.shape:
                    continue
                if group.get("fused") or t.dim() != p.dim() or any(
                        n not in (1, m) for n, m in zip(t.shape, p.shape, strict=True)):
                    raise ValueError(f"optimizer state {name!r} of shape {list(t.shape)} "
                                     f"for a parameter of shape {list(p.shape)}")


def override_settings(opt: torch.optim.Optimizer, optim_cfg: DictConfig, ckpt: dict,
                      scheduled: bool) -> None:
    """optim settings given now win over the saved ones, except the lr under a schedule:
    the schedule's saved state owns it, so a changed optim.lr is refused, not half-applied."""
    settings = optimizer_settings(optim_cfg)
    if scheduled:
        saved = (ckpt["config"].get("optim") or {}).get("lr")
        if saved is not None and settings.get("lr") != saved:
            raise UserError(f"optim.lr={settings.get('lr')} differs from the run's ({saved}), "
                            "and an lr_scheduler continues from its saved state; resume "
                            "without changing optim.lr, or start a new run")
        settings.pop("lr", None)
    for group in opt.param_groups:
        group.update({k: v for k, v in settings.items() if k in group})
