"""Networks on z that divergences train for themselves: the critic f: z -> R of the
adversarial Wasserstein-1 divergence with the three ways of keeping it Lipschitz
(``divergence.lipschitz``), and FactorVAE's discriminator (at the end).

By Kantorovich-Rubinstein duality W1(q, p) = sup over 1-Lipschitz f of E_q f - E_p f:

- ``gp``: a gradient penalty (||grad f|| - 1)^2 at random interpolates in the critic's loss
  (Gulrajani et al. 2017). Soft, so f may exceed slope 1 a little; the usual choice.
- ``clip``: every weight clamped to [-c, c] after each critic step (Arjovsky et al. 2017),
  the "parameters constrained to a range" of the original WGAN. f is then K-Lipschitz for
  some unknown K set by c and the widths, so the estimate is divided by the critic's
  measured slope (below) to be in W1's units.
- ``spectral``: each layer divided by its largest singular value, by power iteration
  (Miyato et al. 2018): slope <= 1 by construction, usually below it, so it is divided by
  the measured slope too.

The measured slope (``scale``) is the root mean square of ||grad f|| at prior samples drawn
after the critic's last step: the normalisation the gradient penalty enforces softly (slope
1 on average where the critic is evaluated), so the three report W1 in the same units. A
clipped critic's slope varies (on a 2-D check its mean is ~0.65 of its maximum), so
dividing by the maximum, the strict bound, would under-report W1 by a third. Prior samples
are the same points on every process under data parallelism, so replicas stay identical.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from vae_cli.errors import UserError

LIPSCHITZ = ("gp", "clip", "spectral")


class Critic(nn.Sequential):
    def __init__(self, latent_dim: int, hidden: int, lipschitz: str = "gp",
                 clip: float = 0.01):
        if lipschitz not in LIPSCHITZ:
            raise UserError(f"divergence.lipschitz={lipschitz!r} is not one of {LIPSCHITZ}")
        if not clip > 0:
            raise UserError(f"divergence.clip={clip} must be > 0")
        layers = [nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)]
        if lipschitz == "spectral":
            layers = [spectral_norm(m) if isinstance(m, nn.Linear) else m for m in layers]
        super().__init__(*layers)
        self.lipschitz, self.clip = lipschitz, clip
        if lipschitz != "gp":
            self.register_buffer("scale", torch.ones(()))
        if lipschitz == "clip":
            self.constrain()

    def gap(self, zq: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """E_q f - E_p f in W1's units: the estimate of W1(q, p)."""
        gap = self(zq).mean() - self(zp).mean()
        return gap if self.lipschitz == "gp" else gap / self.scale

    def penalty(self, zq: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """The gradient penalty (gp only; the other constraints need none)."""
        if self.lipschitz != "gp":
            return zq.new_zeros(())
        eps = torch.rand(len(zq), 1, device=zq.device)
        mid = (eps * zq + (1 - eps) * zp).requires_grad_(True)
        (grad,) = torch.autograd.grad(self(mid).sum(), mid, create_graph=True)
        return (grad.norm(dim=1) - 1).pow(2).mean()

    def constrain(self, probe: torch.Tensor | None = None) -> None:
        """After a critic step: clamp the weights (clip), then measure the slope at
        ``probe`` points (clip, spectral): its root mean square."""
        with torch.no_grad():
            if self.lipschitz == "clip":
                for p in self.parameters():
                    p.clamp_(-self.clip, self.clip)
        if self.lipschitz == "gp" or probe is None:
            return
        with torch.enable_grad():
            points = probe.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(points).sum(), points)
        self.scale.fill_(grad.pow(2).sum(1).mean().sqrt().clamp_min(1e-12))


class Discriminator(nn.Sequential):
    """FactorVAE's classifier D: z -> 2 logits, class 0 for samples of q(z), class 1 for
    samples of prod_j q(z_j) (Kim & Mnih 2018: ``layers`` = 6 hidden layers of ``hidden`` =
    1000 units, LeakyReLU 0.2, two logits). At its optimum logit_0 - logit_1 is the log
    density ratio log q(z) / prod_j q(z_j), whose mean over q(z) is the total correlation."""

    def __init__(self, latent_dim: int, hidden: int, layers: int):
        if hidden < 1 or layers < 1:
            raise UserError("divergence.hidden and divergence.layers must be >= 1 (a linear "
                            "classifier cannot see the correlations the TC is made of)")
        mods: list[nn.Module] = []
        width = latent_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        super().__init__(*mods, nn.Linear(width, 2))

    def log_ratio(self, z: torch.Tensor) -> torch.Tensor:
        """logit_0 - logit_1 = log D(z) / (1 - D(z)) per example, [B], in float32."""
        logits = self(z).float()
        return logits[:, 0] - logits[:, 1]
