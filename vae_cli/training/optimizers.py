"""Optimizers beyond torch.optim that published recipes need."""

from __future__ import annotations

import torch


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
