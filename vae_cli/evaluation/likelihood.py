"""The importance-weighted log-likelihood estimate of a split (Burda et al. 2016)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vae_cli.data.batching import labelled
from vae_cli.evaluation.units import per_unit
from vae_cli.objective.bounds import log_weights
from vae_cli.objective.model import VAE
from vae_cli.runtime.progress import bar


@torch.no_grad()
def iwae_bound(model: VAE, x: torch.Tensor, k: int, batch_size: int,
               max_decoded: int = 20000, labels: torch.Tensor | None = None,
               log_prior: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> dict[str, float]:
    """log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x); for a conditional
    model, given the ``labels``, log p(x|y) >= log (1/k) sum_i p(x|z_i, y) p(z_i) / q(z_i|x, y).

    Samples are drawn in chunks so that at most ``max_decoded`` examples go through the
    decoder at once; a running logsumexp merges the chunks. The ELBO is averaged over the
    same samples, so iwae >= elbo holds exactly (Jensen), not just in expectation.
    ``log_prior`` replaces the model's log p(z) (a learned prior over codes).
    A point-mass posterior (VQ) gives k equal weights: one sample is the same estimate.
    """
    k = 1 if model.family.deterministic else k
    was_training = model.training
    model.eval()
    # Fixed weights: the prior (a VampPrior's pass over its pseudo-inputs) is built once, and
    # q(z|x) once per batch, however many chunks the samples take.
    log_prior = log_prior or model.prior.frozen_log_prob()
    iw_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    elbo_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    progress = bar(len(x) * k, f"IWAE bound, k={k}", unit="decodes")
    for xb, yb in labelled(x, labels, batch_size):
        chunk = max(1, min(k, max_decoded // len(xb)))
        acc = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        mean_log_w = torch.zeros(len(xb), dtype=torch.float64, device=x.device)
        done, q = 0, model.posterior(xb, yb)
        while done < k:
            c = min(chunk, k - done)
            log_w = log_weights(model, xb, c, y=yb, log_prior=log_prior, q=q).total().double()
            acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
            mean_log_w += log_w.sum(0)
            done += c
            progress.update(c * len(xb))
        iw_sum += (acc - math.log(k)).sum()
        elbo_sum += (mean_log_w / k).sum()
    progress.close()
    model.train(was_training)
    n = len(x)
    iw, elbo = (iw_sum / n).item(), (elbo_sum / n).item()
    return {"iw_samples": k, "nll_iwae": -iw, "nelbo_iw": -elbo,
            **per_unit(-iw, x, "_iwae")}
