"""The metric suite `vae eval` runs where the data has ground-truth factors: the six metrics of
the reference study (Locatello et al. 2019), each on the encoder's posterior means and each
seeded on its own, so the same seed gives the same numbers whichever metrics run beside it.

MIG and modularity use every example of the evaluated split; SAP and DCI fit predictors on a
seeded share of them and score on the rest (``test_fraction``); the BetaVAE and FactorVAE
scores draw fresh observations from the dataset's oracle, so they need one (and an
unconditional encoder). Every score is written with its settings, and each metric that ran
with a one-line statement of its estimator.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from vae_cli.data.base import FactorOracle
from vae_cli.evaluation.disentanglement.beta_vae import beta_vae
from vae_cli.evaluation.disentanglement.dci import dci
from vae_cli.evaluation.disentanglement.factor_vae import factor_vae
from vae_cli.evaluation.disentanglement.interventions import Encoder
from vae_cli.evaluation.disentanglement.mig import mig
from vae_cli.evaluation.disentanglement.modularity import modularity
from vae_cli.evaluation.disentanglement.sap import sap

log = logging.getLogger(__name__)

METRICS = ("beta_vae", "factor_vae", "mig", "sap", "dci", "modularity")
REPRESENTATION = "posterior mean"
LOGISTIC = ("multinomial logistic regression, standardised inputs, L2 with scikit-learn's C "
            "(c), L-BFGS from zero for at most max_iter iterations")
ESTIMATORS = {
    "beta_vae": f"mean |z1 - z2| over pairs of batches sharing one factor; {LOGISTIC}; "
                "score = held-out accuracy",
    "factor_vae": "latents scaled by their std over variance_points, pruned at variance <= "
                  "prune_var; argmin of the scaled variance over a batch sharing one factor "
                  "votes for it; majority-vote classifier; score = held-out accuracy",
    "mig": "plug-in MI of equal-width bins of each latent with each factor's classes; mean "
           "over factors of (top MI - second MI) / H(factor)",
    "sap": f"per factor and latent a one-dimensional {LOGISTIC}; held-out accuracy; mean over "
           "factors of (best - second best)",
    "dci": "per factor a lasso regression (coordinate descent) of the standardised factor on "
           "the standardised latents; importance |w|; informativeness = held-out NRMSE "
           "(lower is better)",
    "modularity": "MIG's plug-in MI matrix; mean over latents of 1 - (sum of the other "
                  "squared MIs) / (top squared MI x (K - 1))",
}


@dataclass
class Intervention:
    """What the BetaVAE and FactorVAE scores draw from: the oracle and the encoder."""

    oracle: FactorOracle
    encode: Encoder


def train_test(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded partition of n examples: (train rows, test rows)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:], perm[:n_test]


# SAP's classifiers, one per latent and factor, take about a second each on a CPU: a latent
# of thousands of dimensions (model=vdvae's maps) would take hours.
SAP_LATENTS = 256


def _observational(chosen: list[str], z: torch.Tensor, factors: torch.Tensor,
                   names: list[str], settings: dict[str, Any], seed: int, bins: int
                   ) -> tuple[dict, dict[str, str]]:
    result, skipped = {}, {}
    everything = {"representation": REPRESENTATION, "points": len(z), "bins": bins}
    if "mig" in chosen:
        result.update(mig(z, factors, bins, names), mig_settings=dict(everything))
    if "modularity" in chosen:
        result.update(modularity(z, factors, bins), modularity_settings=dict(everything))
    train, test = train_test(len(z), settings["test_fraction"], seed)
    split = {"representation": REPRESENTATION, "train_points": len(train),
             "test_points": len(test), "test_fraction": settings["test_fraction"]}
    for name, metric in (("sap", sap), ("dci", dci)):
        if name not in chosen:
            continue
        if len(train) < 2 or len(test) < 1:
            skipped[name] = f"{len(z)} examples leave too few to fit and to score predictors"
            continue
        if name == "sap" and z.shape[1] > SAP_LATENTS:
            skipped[name] = (f"{z.shape[1]} latents: SAP fits one classifier per latent and "
                             f"factor, done for at most {SAP_LATENTS} latents")
            continue
        result.update(metric(z, factors, train, test, names=names, **settings[name]))
        result[f"{name}_settings"] = {**split, **settings[name], "seed": seed}
    return result, skipped


# Below this many examples the metrics' estimates (MIG's histograms, the predictors' splits)
# say little: said in the log.
FEW = 500


def score(z: torch.Tensor, factors: torch.Tensor, names: list[str], settings: dict[str, Any],
          seed: int, bins: int, intervention: Intervention | None = None,
          no_intervention: str = "no ground-truth oracle") -> dict:
    """The chosen metrics (``settings["metrics"]``) of posterior means z [N, D] against
    factors [N, K]; ``settings`` holds each metric's keyword settings under its name, as
    configs/eval.yaml's eval.disentanglement does. A metric that cannot run is listed under
    disentanglement_skipped with the reason."""
    chosen = list(settings["metrics"])
    if chosen and len(z) < FEW:
        log.warning("disentanglement metrics on %d examples are rough estimates (eval.split "
                    "with at least %d examples, or a larger eval.max_examples)", len(z), FEW)
    start = time.perf_counter()
    result, skipped = _observational(chosen, z, factors, names, settings, seed, bins)
    for name, metric in (("beta_vae", beta_vae), ("factor_vae", factor_vae)):
        if name not in chosen:
            continue
        if intervention is None:
            skipped[name] = no_intervention
            continue
        log.info("%s score: drawing observations from %s", name,
                 type(intervention.oracle).__name__)
        generator = torch.Generator().manual_seed(seed)
        result.update(metric(intervention.oracle, intervention.encode, generator,
                             **settings[name]))
        result[f"{name}_settings"] = {"representation": REPRESENTATION, **settings[name],
                                      "seed": seed}
    result["disentanglement_estimators"] = {k: ESTIMATORS[k] for k in chosen
                                            if f"{k}_settings" in result}
    if skipped:
        result["disentanglement_skipped"] = skipped
    log.info("disentanglement metrics in %.1f s", time.perf_counter() - start)
    return result
