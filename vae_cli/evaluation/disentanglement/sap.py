"""SAP score, Separated Attribute Predictability (Kumar et al. 2018), for discrete factors.

Estimator: for every factor k (its distinct values as classes) and every latent d, a
one-dimensional multinomial logistic regression predicts the factor's class from the
posterior mean z_d alone (see predictors.fit_logistic: standardised input, L2 with
scikit-learn's C convention, L-BFGS); S[d, k] is its accuracy on the held-out points. The
factor's gap is the best minus the second-best latent's accuracy; SAP is the mean gap over the
factors with more than one value. disentanglement_lib scores with a linear SVM (C = 0.01)
instead; a latent that copies one factor and a second that copies it too give that factor a
gap of ~0.
"""

from __future__ import annotations

import torch

from vae_cli.evaluation.disentanglement.information import classes_of
from vae_cli.evaluation.disentanglement.predictors import fit_logistic


def score_matrix(z: torch.Tensor, y: torch.Tensor, classes: int, train: torch.Tensor,
                 test: torch.Tensor, c: float, max_iter: int) -> list[float]:
    """Held-out accuracy of each latent alone at predicting class ids y."""
    return [fit_logistic(z[train, d:d + 1], y[train], classes, c, max_iter)
            .accuracy(z[test, d:d + 1], y[test]) for d in range(z.shape[1])]


def sap(z: torch.Tensor, factors: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
        c: float = 100.0, max_iter: int = 100, names: list[str] | None = None) -> dict:
    """SAP of codes z [N, D] against factors [N, K], classifiers fit on the rows ``train``
    and scored on the rows ``test``; also the gap per factor."""
    z, factors = z.detach().cpu().double(), factors.detach().cpu()
    gaps: dict[str, float] = {}
    for k in range(factors.shape[1]):
        y, classes = classes_of(factors[:, k])
        if classes < 2 or z.shape[1] < 2:
            continue
        top = sorted(score_matrix(z, y, classes, train, test, c, max_iter), reverse=True)
        gaps[names[k] if names else str(k)] = top[0] - top[1]
    score = sum(gaps.values()) / len(gaps) if gaps else float("nan")
    return {"sap": score, "sap_per_factor": gaps}
