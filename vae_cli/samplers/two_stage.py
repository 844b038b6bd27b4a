"""``sampler=two_stage``: a second, small VAE trained on the codes; sampling is its prior ->
its decoder -> the first VAE's decoder (Dai & Wipf 2019, "Diagnosing and enhancing VAE
models")."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vae_cli.errors import UserError
from vae_cli.runtime.progress import counted
from vae_cli.samplers.base import Sampler, check_settings


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
        check_settings(seed, steps=steps, batch_size=batch_size, lr=lr,
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
        for _ in counted(self.steps, "fitting sampler=two_stage", unit="steps"):
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
