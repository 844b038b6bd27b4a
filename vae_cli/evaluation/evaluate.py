"""Scores of a split: example-weighted means of the objective's terms, the negative ELBO,
and its per-unit forms (bits per dim, or per token and perplexity)."""

from __future__ import annotations

import torch

from vae_cli.data.batching import labelled
from vae_cli.evaluation.units import per_unit
from vae_cli.objective.bounds import Objective, negative_elbo
from vae_cli.runtime.device import autocast


def means(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Device sums -> Python floats with a single host sync."""
    names = list(sums)
    return dict(zip(names, torch.stack([sums[k] for k in names]).div(count).tolist(),
                    strict=True))


@torch.no_grad()
def evaluate(objective: Objective, x: torch.Tensor, batch_size: int,
             precision: str = "fp32", labels: torch.Tensor | None = None) -> dict[str, float]:
    """Means of every term the objective reports, at the schedule's end value, with one
    host sync; plus the negative ELBO where the divergence bounds the likelihood and the
    reconstruction loss is a log-density (of x given its ``labels`` for a conditional
    model)."""
    was_training = objective.training
    objective.eval()
    sums: dict[str, torch.Tensor] = {}
    for xb, yb in labelled(x, labels, batch_size):
        with autocast(xb.device, precision):
            terms, _ = objective(xb, y=yb)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach().float() * len(xb)
    objective.train(was_training)
    result = means(sums, len(x))
    if objective.divergence.bounds_likelihood and objective.model.likelihood.density:
        # recon + KL is the negative ELBO whatever beta trained it, so report it apart.
        result["nelbo"] = negative_elbo(result["recon"], result)
        result.update(per_unit(result["nelbo"], x))
    return result
