"""DCI: disentanglement, completeness, informativeness (Eastwood & Williams 2018).

Estimator: posterior means standardised with the training points' mean and std, each factor's
values likewise; one lasso regression per factor on all latents (predictors.lasso: coordinate
descent, penalty ``alpha``) gives the importance matrix R[d, k] = |w_dk|, as in Eastwood &
Williams' lasso variant (disentanglement_lib uses gradient-boosted trees instead).
Disentanglement of latent d is 1 - H_K(R[d, :] / sum_k R[d, k]) (entropy in base K), weighted
by the latent's share of all importance; completeness of factor k is
1 - H_D(R[:, k] / sum_d R[d, k]) (base D), weighted by the factor's share, as disentanglement_lib
weights them. Informativeness is the held-out prediction error of the same regressions:
root-mean-square error in units of the factor's training std (NRMSE; 0 is perfect, 1 is
no better than predicting the mean), averaged over factors: lower is better.
"""

from __future__ import annotations

import math

import torch

from vae_cli.evaluation.disentanglement.predictors import lasso, standardize


def _one_minus_entropy(p: torch.Tensor, base: int) -> torch.Tensor:
    """1 - H(p) / log(base) along the last dim of non-negative rows (normalised here)."""
    p = p / p.sum(-1, keepdim=True)
    h = -torch.special.xlogy(p, p).sum(-1)
    return 1 - h / math.log(base) if base > 1 else torch.ones_like(h)


def weighted(importance: torch.Tensor, base: int) -> float:
    """Sum over rows of (1 - normalised entropy) x the row's share of all importance; rows with
    no importance carry no weight, and no importance at all scores 0."""
    totals = importance.sum(1)
    if totals.sum() <= 0:
        return 0.0
    rows = totals > 0
    per_row = _one_minus_entropy(importance[rows], base)
    return float((per_row * totals[rows]).sum() / totals.sum())


def dci(z: torch.Tensor, factors: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
        alpha: float = 0.001, max_iter: int = 1000, tol: float = 1e-8,
        names: list[str] | None = None) -> dict:
    """DCI of codes z [N, D] against factors [N, K], regressions fit on the rows ``train``
    and scored on the rows ``test``; factors constant over ``train`` are left out."""
    z, factors = z.detach().cpu().double(), factors.detach().cpu().double()
    keep = [k for k in range(factors.shape[1]) if factors[train, k].std() > 0]
    if not keep:
        return {k: float("nan") for k in ("dci_disentanglement", "dci_completeness",
                                          "dci_informativeness")}
    y = factors[:, keep]
    zm, zs = standardize(z[train])
    ym, ys = standardize(y[train])
    z, y = (z - zm) / zs, (y - ym) / ys
    w = lasso(z[train], y[train], alpha, max_iter, tol)
    importance = w.abs()
    error = ((z[test] @ w - y[test]).pow(2).mean(0).sqrt()).tolist()
    labels = [names[k] if names else str(k) for k in keep]
    return {
        "dci_disentanglement": weighted(importance, len(keep)),
        "dci_completeness": weighted(importance.T, z.shape[1]),
        "dci_informativeness": sum(error) / len(error) if error else float("nan"),
        "dci_informativeness_per_factor": dict(zip(labels, error, strict=True)),
        "dci_importance": importance.tolist(),
    }
