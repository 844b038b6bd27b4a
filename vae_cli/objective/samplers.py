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

import math
from typing import Literal

import torch
from torch import nn
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

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


def _check(seed: int, **values: int | float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not value > 0:
            raise UserError(f"sampler.{key}={value} must be > 0")
    if not 0 <= seed < 2**63:
        raise UserError(f"sampler.seed={seed} must be an integer in [0, 2^63)")


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
        _check(seed, components=components, iterations=iterations, tolerance=tolerance,
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


class TwoStage(Sampler):
    """The second stage of Dai & Wipf's two-stage VAE: an MLP VAE over the first VAE's codes
    z ~ q(z|x) (``codes=sample``, as in the paper; ``mean``: the posterior means), with a
    standard normal prior on its own latent u and a Gaussian decoder N(z; g(u), gamma I)
    whose scalar gamma is learned. The codes are standardised per dimension first (undone
    when sampling). Trained with Adam for ``steps`` minibatches.

    Sampling draws from the density it fitted, z = g(u) + sqrt(gamma) eps (``noise=true``);
    ``noise=false`` decodes to the mean g(u) as the paper does. The two agree when gamma
    reaches 0, as the paper's analysis has it for data on a manifold; on full-rank codes
    (z ~ q(z|x) has noise in every direction) a VAE with a learned gamma can equally stop at
    gamma = the variance of the directions it leaves to the noise (the probabilistic PCA
    solution), and the mean alone then lacks that variance."""

    name = "two_stage"

    def __init__(self, hidden: list[int] = (256, 256), code_dim: int | None = None,
                 steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
                 codes: Literal["sample", "mean"] = "sample", noise: bool = True,
                 seed: int = 0, *, latent_dim: int = 1):
        super().__init__(latent_dim)
        _check(seed, steps=steps, batch_size=batch_size, lr=lr,
               **({} if code_dim is None else {"code_dim": code_dim}))
        if codes not in ("sample", "mean"):
            raise UserError(f"sampler.codes={codes!r} is not sample or mean")
        if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden):
            raise UserError(f"sampler.hidden={list(hidden)} must be positive layer widths")
        self.hidden, self.u_dim = list(hidden), code_dim or latent_dim
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.codes, self.noise, self.seed = codes, noise, seed
        self.encoder = mlp(latent_dim, self.hidden, 2 * self.u_dim)
        self.decoder = mlp(self.u_dim, self.hidden, latent_dim)
        self.log_gamma = nn.Parameter(torch.zeros(()))
        self.register_buffer("shift", torch.zeros(latent_dim))
        self.register_buffer("spread", torch.ones(latent_dim))

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        """The second VAE's negative ELBO per code, averaged (nats, up to a constant)."""
        mu, logvar = self.encoder(z).chunk(2, -1)
        logvar = logvar.clamp(-12, 8)
        u = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        log_gamma = self.log_gamma.clamp_min(-12)  # gamma -> 0 is the point; not past fp32
        recon = 0.5 * ((z - self.decoder(u)).pow(2) / log_gamma.exp() + log_gamma).sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        return (recon + kl).mean()

    def fit(self, mu: torch.Tensor, std: torch.Tensor) -> None:
        self.check_codes(mu)
        mu, std = mu.detach().float(), std.detach().float()
        self.shift.copy_(mu.mean(0))
        self.spread.copy_(mu.std(0, unbiased=False).clamp_min(1e-6) if len(mu) > 1
                          else torch.ones_like(self.spread))
        with torch.random.fork_rng(devices=[mu.device] if mu.is_cuda else []):
            torch.manual_seed(self.seed)
            for module in (self.encoder, self.decoder):
                for layer in module:
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()
            nn.init.zeros_(self.log_gamma)
            self._train(mu, std)
        self.eval()

    def _train(self, mu: torch.Tensor, std: torch.Tensor) -> None:
        self.train()
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        batch = min(self.batch_size, len(mu))
        order = torch.randperm(len(mu), device=mu.device)
        at = 0
        for _ in range(self.steps):
            if at + batch > len(order):
                order, at = torch.randperm(len(mu), device=mu.device), 0
            idx = order[at:at + batch]
            at += batch
            z = mu[idx] if self.codes == "mean" else \
                mu[idx] + std[idx] * torch.randn_like(mu[idx])
            opt.zero_grad(set_to_none=True)
            loss = self.loss((z - self.shift) / self.spread)
            if not torch.isfinite(loss):
                raise UserError("sampler=two_stage: the second VAE's loss became non-finite; "
                                "lower sampler.lr")
            loss.backward()
            opt.step()

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        u = torch.randn(n, self.u_dim, device=self.shift.device)
        z = self.decoder(u)
        if self.noise:
            z = z + self.log_gamma.clamp_min(-12).mul(0.5).exp() * torch.randn_like(z)
        return z * self.spread + self.shift

    def problem(self) -> str | None:
        bad = super().problem()
        if bad:
            return bad
        return None if (self.spread > 0).all() else "its code scales are not positive"


def mlp(d_in: int, hidden: list[int], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.SiLU()]
        d_in = h
    return nn.Sequential(*layers, nn.Linear(d_in, d_out))
