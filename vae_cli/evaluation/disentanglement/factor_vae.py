"""FactorVAE score (Kim & Mnih 2018), as disentanglement_lib computes it, with pruning.

Estimator: each latent's posterior mean is scaled by its std over ``variance_points``
observations drawn from the oracle; latents whose variance there is at most ``prune_var``
(collapsed to the prior; 0.01 is the active-units threshold) are left out. One point is a
batch of ``batch_size`` observations sharing the value of one factor chosen uniformly; the
latent with the least variance over the batch, relative to its overall variance, votes for
that factor. The classifier maps each latent to the factor it got most votes for on
``train_points`` points (majority vote); the score is the share of ``test_points`` fresh
points it classifies right. 1 for a code whose latents each follow one factor; about 1/K for
a code that ignores them; 0 when every latent is pruned.
"""

from __future__ import annotations

import torch

from vae_cli.data.base import FactorOracle
from vae_cli.evaluation.disentanglement.interventions import (
    Encoder,
    fixed_factor_batches,
    represent,
    sample_classes,
    varying,
)


def votes(oracle: FactorOracle, encode: Encoder, n: int, batch_size: int,
          scale: torch.Tensor, active: torch.Tensor, generator: torch.Generator
          ) -> torch.Tensor:
    """long [active latents, fixable factors]: how often each latent had the least scaled
    variance in a batch with that factor fixed."""
    classes, label = fixed_factor_batches(oracle, n, batch_size, generator)
    z = represent(oracle, encode, classes.flatten(0, 1)).view(n, batch_size, -1)
    least = (z[..., active].var(1) / scale[active]).argmin(1)
    counts = torch.zeros(int(active.sum()), len(varying(oracle)), dtype=torch.long)
    return counts.index_put_((least, label), torch.ones(n, dtype=torch.long), accumulate=True)


def factor_vae(oracle: FactorOracle, encode: Encoder, generator: torch.Generator,
               batch_size: int = 64, train_points: int = 1000, test_points: int = 500,
               variance_points: int = 5000, prune_var: float = 0.01) -> dict:
    """FactorVAE score: held-out accuracy (and training accuracy) of the majority-vote
    classifier, and how many latents it used."""
    scale = represent(oracle, encode, sample_classes(oracle, variance_points, generator)).var(0)
    active = scale > prune_var
    if not active.any():
        return {"factor_vae": 0.0, "factor_vae_train": 0.0, "factor_vae_active_dims": 0}
    train = votes(oracle, encode, train_points, batch_size, scale, active, generator)
    test = votes(oracle, encode, test_points, batch_size, scale, active, generator)
    rule = train.argmax(1)  # each latent's factor; latents without votes say factor 0
    return {"factor_vae": float(test.gather(1, rule[:, None]).sum() / test.sum()),
            "factor_vae_train": float(train.max(1).values.sum() / train.sum()),
            "factor_vae_active_dims": int(active.sum())}
