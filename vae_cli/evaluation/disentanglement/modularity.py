"""Modularity (Ridgeway & Kulkarni 2018): whether each latent depends on at most one factor.

Estimator: the [D, K] mutual information matrix of MIG's estimate (posterior means in equal-
width bins, factors as classes, plug-in MI). For latent d with largest squared MI theta_max^2
(over factors), delta_d = sum of its other squared MIs / (theta_max^2 (K - 1)) and its
modularity is 1 - delta_d (0 where the latent shares no information with any factor); the
score is the mean over latents, as disentanglement_lib computes it. A latent that copies one
factor scores 1 whether or not another latent copies it too: modularity does not ask for
compactness. The plug-in MI is biased upwards in proportion to (classes - 1), so a latent of
pure noise scores above 0 when the factors have unequal numbers of classes.
"""

from __future__ import annotations

import torch

from vae_cli.evaluation.disentanglement.information import classes_of, mutual_info_matrix


def modularity(z: torch.Tensor, factors: torch.Tensor, bins: int = 20) -> dict:
    """Modularity of codes z [N, D] against factors [N, K] (constant factors left out)."""
    varying = [k for k in range(factors.shape[1]) if classes_of(factors[:, k])[1] > 1]
    if len(varying) < 2:  # one factor: every latent is trivially modular, nothing measured
        return {"modularity": float("nan")}
    sq = mutual_info_matrix(z, factors[:, varying], bins).pow(2)
    top = sq.max(1).values
    delta = (sq.sum(1) - top) / (top * (len(varying) - 1))
    per_latent = torch.where(top > 0, 1 - delta, torch.zeros_like(top))
    return {"modularity": float(per_latent.mean())}
