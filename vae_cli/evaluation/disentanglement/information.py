"""Plug-in information estimates shared by MIG and modularity: latents discretised into
equal-width bins over their observed range, factors taken as classes of their distinct values.
"""

from __future__ import annotations

import torch


def classes_of(v: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A factor's distinct values as class ids 0..n-1 (factors live on grids), and n."""
    values, codes = torch.unique(v, return_inverse=True)
    return codes, len(values)


def discretize(z: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bins per column over its observed range: long [N, D] in 0..bins-1."""
    lo, hi = z.min(0).values, z.max(0).values
    scaled = (z - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled * bins).long().clamp_(0, bins - 1)


def entropy(codes: torch.Tensor, n_values: int) -> float:
    """Plug-in entropy in nats of class ids 0..n_values-1."""
    p = torch.bincount(codes, minlength=n_values).double() / len(codes)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def mutual_info(a: torch.Tensor, na: int, b: torch.Tensor, nb: int) -> float:
    """Plug-in mutual information in nats of two class-id vectors (its joint histogram)."""
    joint = torch.bincount(a * nb + b, minlength=na * nb).double().view(na, nb) / len(a)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    mask = joint > 0
    return float((joint[mask] * (joint[mask] / (pa @ pb)[mask]).log()).sum())


def mutual_info_matrix(z: torch.Tensor, factors: torch.Tensor, bins: int) -> torch.Tensor:
    """float64 [D, K]: I(z_d; v_k) in nats between each discretised latent and each factor."""
    zc = discretize(z.detach().cpu().double(), bins)
    columns = [classes_of(factors[:, k].detach().cpu()) for k in range(factors.shape[1])]
    return torch.tensor([[mutual_info(v, nv, zc[:, d], bins) for v, nv in columns]
                         for d in range(z.shape[1])], dtype=torch.float64)
