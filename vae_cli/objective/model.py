"""VAE = encoder + decoder + prior + divergence + likelihood (+ schedule), composed."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from vae_cli.objective.divergences import Divergence
from vae_cli.objective.likelihoods import Likelihood
from vae_cli.objective.priors import Prior
from vae_cli.objective.schedules import Constant, Schedule
from vae_cli.tokens import is_tokens, lengths

# Argument validation in torch.distributions syncs with the device on every call and costs
# more than the maths at these sizes; inputs here are built by the model itself.
torch.distributions.Distribution.set_default_validate_args(False)

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar) finite in float32 and std > 0


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior,
                 divergence: Divergence, likelihood: Likelihood, latent_dim: int,
                 schedule: Schedule | None = None, iw_samples: int = 1):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.prior, self.divergence, self.likelihood = prior, divergence, likelihood
        self.latent_dim, self.iw_samples = latent_dim, iw_samples
        self.schedule = schedule or Constant()
        # A sequence decoder reads the sequence it scores (teacher forcing): decode(z, x).
        self.autoregressive = getattr(decoder, "autoregressive", False)
        self.shard = (0, 1)  # (rank, world size) under data parallelism; see rsample
        prior.bind(self.posterior)

    def posterior(self, x: torch.Tensor) -> Distribution:
        mu, logvar = self.encoder(x).float().chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        return Independent(Normal(mu, std), 1)

    def rsample(self, q: Distribution, k: int | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, [B, D] (or [k, B, D]). Under data parallelism each rank
        draws the noise of the whole global batch and keeps its own rows, so N ranks use
        exactly the noise one process would, and the random streams stay in step."""
        mu, std = q.base_dist.loc, q.base_dist.scale
        rank, world = self.shard
        lead = () if k is None else (k,)
        eps = torch.randn(*lead, world * len(mu), mu.shape[-1], device=mu.device, dtype=mu.dtype)
        return mu + std * eps[..., rank * len(mu):(rank + 1) * len(mu), :]

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z, x) if self.autoregressive else self.decoder(z)

    def forward(self, x: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean loss = recon + scheduled weight * div, with every term for logging."""
        if self.iw_samples > 1:
            return self.iwae(x, self.iw_samples, step)
        q = self.posterior(x)
        z = self.rsample(q)
        recon = self.likelihood.nll(self.decode(z, x), x).mean()
        terms = self.divergence(q, z, self.prior)
        div = self.schedule.term(terms["div"], self.divergence.weight(), step)
        return {"loss": recon + div, "recon": recon, **terms}

    def log_weights(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """log p(x|z), log p(z), log q(z|x) for k samples z ~ q(z|x): each [k, B]."""
        q = self.posterior(x)
        z = self.rsample(q, k)
        # x broadcasts against the k decodes: no k copies of the batch in memory, except
        # for a sequence decoder, which reads x once per sample
        xs = x.expand(k, *x.shape).reshape(-1, *x.shape[1:]) if self.autoregressive else None
        out = self.decode(z.reshape(-1, z.shape[-1]), xs)
        log_px = -self.likelihood.nll(out.view(k, len(x), *out.shape[1:]), x)
        return log_px, self.prior.log_prob(z), q.log_prob(z)

    def iwae(self, x: torch.Tensor, k: int, step: int | None = None) -> dict[str, torch.Tensor]:
        """The importance-weighted bound (Burda et al. 2016) as a loss; k = 1 is the ELBO.
        The weight scales log p(z) - log q(z|x) inside each importance weight."""
        log_px, log_pz, log_qz = self.log_weights(x, k)
        w = self.schedule.factor(step) * self.divergence.weight()
        bound = torch.logsumexp(log_px + w * (log_pz - log_qz), dim=0) - math.log(k)
        return {"loss": -bound.mean(), "recon": -log_px.mean(), "div": (log_qz - log_pz).mean()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the main optimizer steps: all but a divergence's own (critic) parameters."""
        return [p for n, p in self.named_parameters() if not n.startswith("divergence.")]

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
        """Latents on the straight lines from the posterior mean of each a[i] to that of
        b[i], the usual latent homotopy (Bowman et al. 2016): [pairs, steps, D]."""
        mu_a, mu_b = self.posterior(a).mean, self.posterior(b).mean
        t = torch.linspace(0, 1, steps, device=mu_a.device).view(1, -1, 1)
        return (1 - t) * mu_a.unsqueeze(1) + t * mu_b.unsqueeze(1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior mean: an image in [0, 1], or greedily decoded token ids."""
        return self.generate(self.posterior(x).mean)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
        """Images (likelihood mean) or token ids (greedy, or sampled at a temperature)."""
        if self.autoregressive:
            return self.decoder.generate(z, temperature)
        return self.likelihood.mean(self.decode(z))


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))


def per_unit(nats: float, x: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """A mean per-example NLL in the units each kind of data is reported in: bits per
    dimension for images; per token and perplexity = exp(total NLL / tokens) for token
    sequences, tokens counting <eos> (as in the language-modelling literature)."""
    if is_tokens(x):
        per_token = nats * len(x) / lengths(x).sum().item()
        return {f"nll_token{suffix}": per_token, f"ppl{suffix}": math.exp(per_token)}
    return {f"bpd{suffix}": bits_per_dim(nats, math.prod(x.shape[1:]))}
