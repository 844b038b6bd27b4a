"""Samplers of z for the decoder: the prior, or a density fitted after training to the codes
of the training split (the aggregate posterior).

A VAE's prior and its aggregate posterior q(z) = E_x q(z|x) rarely match, and decoding
prior draws from regions q(z) leaves empty gives poor samples. Two post-hoc fixes:

- ``GaussianMixture``: a mixture fitted by EM to the posterior means (Ghosh et al. 2020,
  "From variational to deterministic autoencoders", ex-post density estimation).
- ``TwoStage``: a second, small VAE trained on the codes; sampling is its prior -> its
  decoder -> the first VAE's decoder (Dai & Wipf 2019, "Diagnosing and enhancing VAE
  models"). Its decoder has a learned variance gamma, the ingredient that lets the second
  stage match q(z) where a fixed-variance one would blur it.

Protocol: ``fit(mu, std)`` with the posterior means and standard deviations of the training
split ([N, D] each), seeded by the sampler's own ``seed``; ``sample(n)`` draws [n, D] from
the global torch generator (the command seeds it); ``problem()`` says what is wrong with a
loaded state (None when it is usable). Fitted state is buffers and parameters only, so a
state_dict is all a saved sampler holds.
"""

from __future__ import annotations

import torch
from torch import nn

from vae_cli.errors import UserError
from vae_cli.objective.priors import Prior


class Sampler(nn.Module):
    name = "sampler"
    needs_fit = True  # False: nothing to fit or save (the prior)
    density = False  # True: log_prob(z) is known, and can stand for p(z) in a bound

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def fit(self, mu: torch.Tensor, std: torch.Tensor) -> None:
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def problem(self) -> str | None:
        """What makes a loaded state unusable (non-finite or impossible values), or None."""
        for key, value in self.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"{key} holds non-finite values"
        return None

    def check_codes(self, mu: torch.Tensor) -> None:
        if mu.dim() != 2 or mu.shape[1] != self.latent_dim:
            raise UserError(f"sampler={self.name}: codes of shape {tuple(mu.shape)}, expected "
                            f"[N, {self.latent_dim}]")


class PriorSampler(Sampler):
    """The model's own prior p(z): what `vae sample` always drew."""

    name = "prior"
    needs_fit = False

    def __init__(self, *, latent_dim: int = 1, prior: Prior | None = None):
        super().__init__(latent_dim)
        # A bound method, not a submodule: the prior's weights belong to the model, not here.
        self._draw = None if prior is None else prior.sample

    def fit(self, mu: torch.Tensor, std: torch.Tensor) -> None:
        pass

    def sample(self, n: int) -> torch.Tensor:
        if self._draw is None:
            raise ValueError("PriorSampler was built without a prior")
        return self._draw(n)


def check_settings(seed: int, **values: int | float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not value > 0:
            raise UserError(f"sampler.{key}={value} must be > 0")
    if not 0 <= seed < 2**63:
        raise UserError(f"sampler.seed={seed} must be an integer in [0, 2^63)")
