"""Quantizers beyond the VQ codebook, as posterior families over codes (like ``posterior=vq``
in discrete.py: ``prior=uniform``, ``divergence=kl`` with KL = H W log K, the PixelCNN prior
fitted over their codes afterwards).

- ``fsq`` (Mentzer et al. 2023, finite scalar quantization): each channel d of the
  encoder's map is bounded and rounded to one of ``levels[d]`` values; the codes are the
  lattice of those values, K = prod(levels) of them, with no codebook and no auxiliary
  loss. The bound is f(z) = tanh(z + s) (L - 1)(1 + 1e-3) / 2 - o, with o = 1/2 for an
  even L (so rounding gives L values, not L + 1) and s = atanh(o / ((L - 1)(1 + 1e-3) / 2))
  (so f(0) = 0); z_q = round(f(z)) / (L // 2), in [-1, 1]. Gradients pass straight through
  the rounding to f(z).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution

from vae_cli.errors import UserError
from vae_cli.objective.discrete import Discrete, Quantized, UniformCodes, usage


class FiniteScalar(Discrete):
    option = "fsq"
    spatial = True
    deterministic = True  # q(z|x) is a point mass

    def __init__(self, levels: list[int] = (8, 5, 5, 5), *, latent_dim: int):
        super().__init__()
        levels = list(levels)
        if any(not isinstance(n, int) or n < 2 for n in levels):
            raise UserError(f"posterior.levels={levels} must be integers >= 2")
        if len(levels) != latent_dim:
            raise UserError(f"posterior=fsq rounds each of the encoder's model.latent_dim="
                            f"{latent_dim} channels to its own number of levels, and "
                            f"posterior.levels={levels} has {len(levels)}: set "
                            f"model.latent_dim={len(levels)} or give one level per channel")
        self.levels = levels
        n = torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("n", n, persistent=False)
        self.register_buffer("basis", torch.tensor([math.prod(levels[:i])
                                                    for i in range(len(levels))]),
                             persistent=False)
        self.hw: tuple[int, int] = (1, 1)  # the encoder's map, set by the model's builder

    def outputs(self, latent_dim: int) -> int:
        return latent_dim  # channels of the encoder's map

    @property
    def grid(self) -> tuple[int, int]:
        return self.hw

    @property
    def classes(self) -> int:
        return math.prod(self.levels)

    @property
    def half(self) -> torch.Tensor:
        """L // 2 per channel: the scale from rounded values to [-1, 1]."""
        return torch.div(self.n, 2, rounding_mode="floor")

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) of the module docstring, per channel of z [..., D, H, W]."""
        half_l = (self.n - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.n % 2 == 0, 0.5, 0.0)
        return torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset

    def forward(self, h: torch.Tensor) -> Quantized:
        bounded = self.bound(h.float()) / self.half  # what the gradient flows through
        zq = self.lattice(bounded)
        digits = (zq * self.half + self.half).round().long()
        indices = (digits * self.basis.view(-1, 1, 1)).sum(-3)
        return Quantized(bounded, zq, indices)

    def lattice(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest lattice point of each channel value of z [..., D, H, W]."""
        lo = -self.half
        hi = self.n - 1 - self.half
        return torch.minimum(torch.maximum((z * self.half).round(), lo), hi) / self.half

    def terms(self, q: Quantized) -> dict[str, torch.Tensor]:
        """No loss of its own; what is logged: how the batch uses the codes."""
        return usage(q.indices, self.classes)

    def maps(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().view(len(z), len(self.levels), *self.hw)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        digits = (self.lattice(self.maps(z)) * self.half + self.half).round().long()
        return (digits * self.basis.view(-1, 1, 1)).sum(1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(1) // self.basis.view(-1, 1, 1)) % self.n.long()
        return ((digits - self.half) / self.half).flatten(1)

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return self.lattice(self.maps(z)).flatten(1)

    def uniform(self, latent_dim: int) -> Distribution:
        hh, ww = self.hw

        def draw(n: int) -> torch.Tensor:
            return self.embed(torch.randint(self.classes, (n, hh, ww),
                                            device=self.basis.device))

        return UniformCodes(hh * ww, self.classes, latent_dim, draw)
