"""BetaVAE score (Higgins et al. 2017), as disentanglement_lib computes it.

Estimator: one point is a pair of batches of ``batch_size`` observations drawn from the
oracle, the second batch sharing with the first, row by row, the value of one factor chosen
uniformly (the others drawn afresh); its feature is the mean over the batch of |z1 - z2| of the
posterior means, its label the fixed factor. A multinomial logistic regression
(predictors.fit_logistic: standardised features, L2 with scikit-learn's C, L-BFGS) is fit on
``train_points`` points; the score is its accuracy on ``test_points`` fresh points. 1 for a
code whose latents each follow one factor; about 1/K (K factors) for a code that ignores them.
"""

from __future__ import annotations

import torch

from vae_cli.data.base import FactorOracle
from vae_cli.evaluation.disentanglement.interventions import (
    Encoder,
    paired_batches,
    represent,
    varying,
)
from vae_cli.evaluation.disentanglement.predictors import fit_logistic


def points(oracle: FactorOracle, encode: Encoder, n: int, batch_size: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, D] (mean |z1 - z2| over each pair of batches) and labels [n]."""
    classes, label = paired_batches(oracle, n, batch_size, generator)
    z = represent(oracle, encode, classes.flatten(0, 2)).view(2, n, batch_size, -1)
    return (z[0] - z[1]).abs().mean(1), label


def beta_vae(oracle: FactorOracle, encode: Encoder, generator: torch.Generator,
             batch_size: int = 64, train_points: int = 1000, test_points: int = 500,
             c: float = 1.0, max_iter: int = 100) -> dict:
    """BetaVAE score: held-out accuracy (and training accuracy) of the fixed-factor
    classifier."""
    x_train, y_train = points(oracle, encode, train_points, batch_size, generator)
    x_test, y_test = points(oracle, encode, test_points, batch_size, generator)
    model = fit_logistic(x_train, y_train, len(varying(oracle)), c, max_iter)
    return {"beta_vae": model.accuracy(x_test, y_test),
            "beta_vae_train": model.accuracy(x_train, y_train)}
