"""``sampler=gmm``: a mixture fitted by EM to the posterior means (Ghosh et al. 2020, "From
variational to deterministic autoencoders", ex-post density estimation)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from vae_cli.errors import UserError
from vae_cli.samplers.base import Sampler, check_settings


class GaussianMixture(Sampler):
    """A K-component Gaussian mixture over the posterior means, fitted by EM in float64:
    k-means++ seeds then Lloyd steps for the start, EM until the mean log-likelihood gains
    less than ``tolerance`` nats, ``reg`` added to every covariance's diagonal (keeps an
    emptied component well posed); the best of ``inits`` such starts by log-likelihood.
    ``covariance``: full (the default, as in Ghosh et al.) or diag."""

    name = "gmm"
    density = True

    def __init__(self, components: int = 10, covariance: Literal["full", "diag"] = "full",
                 iterations: int = 200, tolerance: float = 1e-4, reg: float = 1e-6,
                 inits: int = 3, seed: int = 0, *, latent_dim: int = 1):
        super().__init__(latent_dim)
        check_settings(seed, components=components, iterations=iterations, tolerance=tolerance,
               reg=reg, inits=inits)
        if covariance not in ("full", "diag"):
            raise UserError(f"sampler.covariance={covariance!r} is not full or diag")
        self.k, self.covariance, self.iterations = components, covariance, iterations
        self.tolerance, self.reg, self.inits, self.seed = tolerance, reg, inits, seed
        d = latent_dim
        self.register_buffer("weights", torch.full((components,), 1 / components))
        self.register_buffer("means", torch.zeros(components, d))
        # full: Cholesky factors [K, D, D]; diag: standard deviations [K, D]
        scale = torch.eye(d).repeat(components, 1, 1) if covariance == "full" else \
            torch.ones(components, d)
        self.register_buffer("scale", scale)

    def fit(self, mu: torch.Tensor, std: torch.Tensor) -> None:
        self.check_codes(mu)
        if len(mu) < self.k:
            raise UserError(f"sampler.components={self.k} is more than the {len(mu)} "
                            "training codes; use fewer components")
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        x = mu.detach().to("cpu", torch.float64)
        best = None
        for _ in range(self.inits):  # EM finds a local optimum: keep the likeliest start
            resp = torch.nn.functional.one_hot(kmeans_start(x, self.k, gen), self.k)
            fit = em(x, resp.to(x.dtype), self.covariance, self.iterations, self.tolerance,
                     self.reg)
            if best is None or fit[0] > best[0]:
                best = fit
        _, weights, means, cov = best
        self.weights.copy_(weights)
        self.means.copy_(means)
        self.scale.copy_(torch.linalg.cholesky(cov) if self.covariance == "full"
                         else cov.sqrt())

    def dist(self) -> MixtureSameFamily:
        if self.covariance == "full":
            comp = MultivariateNormal(self.means, scale_tril=self.scale, validate_args=False)
        else:
            comp = Independent(Normal(self.means, self.scale, validate_args=False), 1)
        return MixtureSameFamily(Categorical(probs=self.weights, validate_args=False), comp,
                                 validate_args=False)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        return self.dist().sample((n,))

    @torch.no_grad()
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.dist().log_prob(z.to(self.means.dtype)).to(z.dtype)

    def problem(self) -> str | None:
        bad = super().problem()
        if bad:
            return bad
        w = self.weights.double()
        if (w < 0).any() or abs(float(w.sum()) - 1) > 1e-4:
            return "its mixture weights are not a probability vector"
        diag = self.scale.diagonal(dim1=-2, dim2=-1) if self.covariance == "full" else \
            self.scale
        if not (diag > 0).all():
            return "its covariances are not positive definite"
        if self.covariance == "full" and not torch.equal(self.scale, self.scale.tril()):
            return "its covariance factors are not lower triangular"
        return None


def kmeans_start(x: torch.Tensor, k: int, gen: torch.Generator,
                 steps: int = 10) -> torch.Tensor:
    """Hard assignments [N] to k clusters: k-means++ seeding (Arthur & Vassilvitskii 2007)
    from ``gen``, then a few Lloyd steps; the usual start of EM (sklearn's default too)."""
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(1).values.pow(2)
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres = torch.cat([centres, x[torch.multinomial(p, 1, generator=gen)]])
    for _ in range(steps):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return torch.cdist(x, centres).argmin(1)


def em(x: torch.Tensor, resp: torch.Tensor, covariance: str, iterations: int,
       tolerance: float, reg: float) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a Gaussian mixture from initial responsibilities [N, K]: the mean
    log-likelihood reached, weights [K], means [K, D] and covariances ([K, D, D] for full,
    variances [K, D] for diag)."""
    previous = -math.inf
    for _ in range(iterations):
        weights, means, cov = m_step(x, resp, covariance, reg)
        log_joint = component_log_probs(x, means, cov, covariance) + weights.log()
        log_px = torch.logsumexp(log_joint, 1)
        resp = (log_joint - log_px[:, None]).exp()
        ll = float(log_px.mean())
        if ll - previous < tolerance:
            break
        previous = ll
    return (ll, *m_step(x, resp, covariance, reg))


def m_step(x: torch.Tensor, resp: torch.Tensor, covariance: str, reg: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
    means = resp.T @ x / counts[:, None]
    if covariance == "diag":
        var = resp.T @ x.pow(2) / counts[:, None] - means.pow(2)
        return counts / len(x), means, var.clamp_min(0) + reg
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    cov = torch.stack([((resp[:, j, None] * (x - means[j])).T @ (x - means[j])) / counts[j]
                       for j in range(len(means))])
    return counts / len(x), means, (cov + cov.transpose(1, 2)) / 2 + reg * eye


def component_log_probs(x: torch.Tensor, means: torch.Tensor, cov: torch.Tensor,
                        covariance: str) -> torch.Tensor:
    """log N(x_n; mean_k, cov_k), [N, K]."""
    if covariance == "diag":
        d = x[:, None, :] - means[None]
        return -0.5 * (d.pow(2) / cov + cov.log() + math.log(2 * math.pi)).sum(-1)
    chol = torch.linalg.cholesky(cov)
    out = []
    for j in range(len(means)):
        sol = torch.linalg.solve_triangular(chol[j], (x - means[j]).T, upper=False)
        logdet = 2 * chol[j].diagonal().log().sum()
        out.append(-0.5 * (sol.pow(2).sum(0) + logdet + x.shape[1] * math.log(2 * math.pi)))
    return torch.stack(out, 1)
