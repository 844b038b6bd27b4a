"""Mutual Information Gap (Chen et al. 2018) from encoder means.

Estimator (documented because MIG depends on it): each latent dimension's
posterior means are discretised into ``bins`` equal-width bins over their observed range;
each ground-truth factor takes its distinct values as classes (shapes/dSprites factors live
on grids). I(v_k; z_j) is the plug-in discrete mutual information of the joint histogram,
H(v_k) the plug-in entropy. MIG = mean over factors with H > 0 of
(I_top1 - I_top2) / H(v_k): 1 for a perfectly disentangled code, ~0 for none.
This is disentanglement_lib's "discretized MIG"; the plug-in MI is biased upwards by about
(bins - 1)(classes - 1) / (2N) nats, so use thousands of examples.
"""

from __future__ import annotations

import torch

from vae_cli.evaluation.disentanglement.information import (
    classes_of,
    discretize,
    entropy,
    mutual_info,
)


def mig(z: torch.Tensor, factors: torch.Tensor, bins: int = 20,
        names: list[str] | None = None) -> dict:
    """MIG of codes z [N, D] against factors [N, K]; also the gap per factor."""
    z, factors = z.detach().cpu().double(), factors.detach().cpu()
    zc = discretize(z, bins)
    gaps: dict[str, float] = {}
    for k in range(factors.shape[1]):
        v, nv = classes_of(factors[:, k])
        h = entropy(v, nv)
        if h <= 0 or z.shape[1] < 2:
            continue
        mi = sorted((mutual_info(v, nv, zc[:, j], bins) for j in range(z.shape[1])),
                    reverse=True)
        name = names[k] if names else str(k)
        gaps[name] = (mi[0] - mi[1]) / h
    score = sum(gaps.values()) / len(gaps) if gaps else float("nan")
    return {"mig": score, "mig_per_factor": gaps, "mig_bins": bins}
