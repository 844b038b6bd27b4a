"""The model: encoder q(z|x), decoder p(x|z) through a likelihood, and a prior p(z).

How their terms combine into a loss or a bound is not here but in ``bounds.py``; this module
only computes distributions, samples and decodes.

A conditional VAE (Sohn et al. 2015) models p(x|y): q(z|x, y) and p(x|z, y) read the class
y, the prior p(z) stays unconditional. Its methods take ``y`` as an argument: class ids [B]
(made one-hot here) or rows of class probabilities [B, C] (a VampPrior's soft labels). An
unconditional model takes ``y=None`` and runs exactly the code it always ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution

from vae_cli.nets import Networks
from vae_cli.objective.likelihoods import Likelihood
from vae_cli.objective.parallel import WHOLE, Shard, global_noise
from vae_cli.objective.posteriors import LatentDistribution, Posterior, mean_of
from vae_cli.objective.priors import Prior


class VAE(nn.Module):
    def __init__(self, nets: Networks, family: Posterior, prior: Prior, likelihood: Likelihood,
                 latent_dim: int):
        super().__init__()
        self.encoder, self.decoder, self.family = nets.encoder, nets.decoder, family
        self.prior, self.likelihood, self.latent_dim = prior, likelihood, latent_dim
        # A sequence decoder reads the sequence it scores (teacher forcing): decode(z, x).
        self.autoregressive = nets.autoregressive
        self.out_numel = nets.out_numel  # decoder outputs per example, where large
        self.num_classes = nets.classes  # 0: unconditional
        prior.bind(self.posterior)
        prior.attach(family)

    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight tensor (LDM's ``decoder.conv_out.weight``): where an
        adversarial loss compares its gradient with the reconstruction's."""
        return [p for p in self.decoder.parameters() if p.dim() > 1][-1]

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def one_hot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """What the networks read for the labels y: class ids -> one-hot float rows; rows of
        class probabilities as given. None for an unconditional model, which takes none."""
        if not self.num_classes:
            if y is not None:
                raise ValueError("labels given to an unconditional model")
            return None
        if y is None:
            raise ValueError("a conditional model needs the class labels y")
        if y.is_floating_point():
            return y
        return F.one_hot(y.long(), self.num_classes).float()

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Distribution:
        """q(z|x), or q(z|x, y) for a conditional model."""
        c = self.one_hot(y)
        h = self.encoder(x) if c is None else self.encoder(x, c)
        return self.family(h)

    def rsample(self, q: Distribution, k: int | None = None, shard: Shard = WHOLE,
                step: int | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, [B, D] (or [k, B, D]); other families draw from their own
        noise (``step``: the training step, None outside training). Under data parallelism
        each rank draws the noise of the whole global batch and keeps its own rows, so N
        ranks use exactly the noise one process would, and the random streams stay in
        step."""
        lead = () if k is None else (k,)
        device = q.device if isinstance(q, LatentDistribution) else q.base_dist.loc.device
        noise = global_noise(shard, lead, q.batch_shape[0], device)

        if isinstance(q, LatentDistribution):
            return q.draw(noise, lead, step)
        base = q.base_dist
        return base.loc + base.scale * noise(torch.randn, base.loc.shape[-1])

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood parameters of p(x|z), or p(x|z, y) for a conditional model."""
        if self.autoregressive:
            return self.decoder(z, x)
        c = self.one_hot(y)
        return self.decoder(z) if c is None else self.decoder(z, c)

    def log_px(self, z: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x|z) (or p(x|z, y)) for z [B, D] -> [B], or z [k, B, D] -> [k, B]. For
        images x broadcasts against the k decodes (no k copies of the batch in memory); a
        sequence decoder reads x once per sample, and its k copies are scored as one batch;
        a conditional decoder reads y."""
        if z.dim() == 2:
            return -self.likelihood.nll(self.decode(z, x, y), x)
        k, flat = len(z), z.reshape(-1, z.shape[-1])
        if self.autoregressive:
            xs = x.expand(k, *x.shape).reshape(-1, *x.shape[1:])
            return -self.likelihood.nll(self.decode(flat, xs), xs).view(k, len(x))
        ys = None if y is None else y.expand(k, *y.shape).reshape(-1, *y.shape[1:])
        out = self.decode(flat, None, ys)
        return -self.likelihood.nll(out.view(k, len(x), *out.shape[1:]), x)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int,
                    ya: torch.Tensor | None = None,
                    yb: torch.Tensor | None = None) -> torch.Tensor:
        """Latents on the straight lines from the posterior mean of each a[i] to that of
        b[i], the usual latent homotopy (Bowman et al. 2016): [pairs, steps, D]. Each end
        is encoded with its own label, if the model reads one."""
        mu_a, mu_b = mean_of(self.posterior(a, ya)), mean_of(self.posterior(b, yb))
        t = torch.linspace(0, 1, steps, device=mu_a.device).view(1, -1, 1)
        return (1 - t) * mu_a.unsqueeze(1) + t * mu_b.unsqueeze(1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded posterior mean: an image in [0, 1], or greedily decoded token ids."""
        return self.generate(mean_of(self.posterior(x, y)), y=y)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, temperature: float = 0.0,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """Images (likelihood mean) or token ids (greedy, or sampled at a temperature);
        a conditional model draws the classes y."""
        if self.autoregressive:
            return self.decoder.generate(z, temperature)
        return self.likelihood.mean(self.decode(self.family.snap(z), y=y))
