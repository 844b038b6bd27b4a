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
- ``rvq`` (residual VQ; Zeghidour et al. 2021, SoundStream): ``quantizers`` VQ codebooks
  (each as ``posterior=vq``'s, EMA-trained, dead codes restarted), the first quantizing the
  encoder's map, each next one what the ones before left; z_q is their sum, gradients
  straight through to the map, each stage's commitment term on its own residual. With
  ``dropout`` each training example keeps only its first n ~ U{1..N} stages, so any prefix
  decodes (bitrate scalability). The codes are N maps of K, stacked: a grid of N H x W
  positions (the PixelCNN prior reads them stage after stage), K^N values per position.
- ``lfq`` (lookup-free quantization; Yu et al. 2023, MAGVIT-v2): each channel of the map is
  quantized to its sign, z_q in {-1, 1}^D, the code the binary number of its signs
  (K = 2^D), straight-through gradients. Its penalty is ``entropy_weight`` x (the mean
  entropy of each position's soft code distribution - ``diversity`` x the entropy of their
  batch mean), q(c | z) proportional to exp(-|z - c|^2 / ``temperature``): confident codes,
  all of them used. Plus the commitment term |z - sg(z_q)|^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae_cli.errors import UserError
from vae_cli.objective.discrete import CodeMap, Quantized, VectorQuantizer, usage
from vae_cli.objective.parallel import AllSum


class FiniteScalar(CodeMap):
    option = "fsq"

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
        if math.prod(levels) >= 2**62:  # the codes are indexed by int64
            raise UserError(f"posterior.levels={levels} make {math.prod(levels):.3g} codes, too "
                            "many to index")
        self.levels = levels
        n = torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("n", n, persistent=False)
        self.register_buffer("basis", torch.tensor([math.prod(levels[:i])
                                                    for i in range(len(levels))]),
                             persistent=False)

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


class Residuals(Quantized):
    """q(z|x) of residual VQ: a point mass on the sum of the kept stages' codes, with each
    stage's commitment term [B] and code indices [B, N, H, W]."""

    def __init__(self, ze: torch.Tensor, zq: torch.Tensor, indices: torch.Tensor,
                 commit: torch.Tensor):
        super().__init__(ze, zq, indices)
        self.commit = commit


class ResidualVQ(CodeMap):
    option = "rvq"

    def __init__(self, quantizers: int = 4, codes: int = 256, commitment: float = 0.25,
                 decay: float = 0.99, epsilon: float = 1e-5, restart: float = 1.0,
                 dropout: bool = False, kmeans: int = 0, *, latent_dim: int):
        super().__init__()
        if quantizers < 1:
            raise UserError(f"posterior.quantizers={quantizers} must be >= 1")
        self.stages = torch.nn.ModuleList(
            VectorQuantizer(codes, commitment, True, decay, epsilon, restart, kmeans,
                            latent_dim=latent_dim) for _ in range(quantizers))
        self.k, self.beta, self.dropout = codes, commitment, dropout

    @property
    def hw(self) -> tuple[int, int]:
        return self.stages[0].hw

    @hw.setter
    def hw(self, hw: tuple[int, int]) -> None:
        for stage in self.stages:
            stage.hw = hw

    def distribute(self, all_sum: AllSum) -> None:
        for stage in self.stages:
            stage.distribute(all_sum)

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.stages) * self.hw[0], self.hw[1]

    @property
    def classes(self) -> int:
        return self.k

    def kept(self, b: int, device: torch.device) -> torch.Tensor:
        """[B, N] 1 for the stages each example keeps: its first n ~ U{1..N} under
        quantizer dropout in training, all of them otherwise."""
        n = len(self.stages)
        if not (self.training and self.dropout):
            return torch.ones(b, n, device=device)
        first = torch.randint(1, n + 1, (b, 1), device=device)
        return (torch.arange(n, device=device) < first).float()

    def forward(self, h: torch.Tensor) -> Residuals:
        ze = h.float()
        keep = self.kept(len(ze), ze.device)
        residual, total = ze, torch.zeros_like(ze)
        commits, indices = [], []
        for s, stage in enumerate(self.stages):
            q = stage(residual.detach() if s else residual)
            m = keep[:, s].view(-1, 1, 1, 1)
            commits.append(((residual - q.zq.detach()).pow(2) * m).flatten(1).sum(1))
            total = total + m * q.zq
            residual = residual - q.zq.detach()
            indices.append(q.indices)
        return Residuals(ze, total, torch.stack(indices, 1), torch.stack(commits, 1))

    def terms(self, q: Residuals) -> dict[str, torch.Tensor]:
        """The commitment terms (per example, summed over stages and the grid) as the
        penalty, and each stage's code usage."""
        commit = q.commit.sum(1).mean()
        out = {"penalty": self.beta * commit, "commit": commit.detach()}
        for s in range(len(self.stages)):
            for name, v in usage(q.indices[:, s], self.k).items():
                out[f"{name}_{s + 1}"] = v
        return out

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        hh, ww = self.hw
        residual = z.float().view(len(z), -1, hh, ww)
        found = []
        for stage in self.stages:
            idx = stage.codes(residual.flatten(1))
            residual = residual - stage.embed(idx).view_as(residual)
            found.append(idx)
        return torch.cat(found, 1)  # [B, N H, W]

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        per = indices.view(len(indices), len(self.stages), *self.hw)
        return sum(stage.embed(per[:, s]) for s, stage in enumerate(self.stages))

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return self.embed(self.codes(z))


class LookupFree(CodeMap):
    option = "lfq"

    def __init__(self, entropy_weight: float = 0.1, diversity: float = 1.0,
                 temperature: float = 0.01, commitment: float = 0.25, *, latent_dim: int):
        super().__init__()
        if not 1 <= latent_dim <= 16:
            raise UserError(f"posterior=lfq has 2^model.latent_dim codes and computes their "
                            f"batch entropy exactly: model.latent_dim={latent_dim} must be "
                            "1 to 16")
        if entropy_weight < 0 or diversity < 0 or not temperature > 0 or commitment < 0:
            raise UserError("posterior=lfq needs entropy_weight, diversity and commitment "
                            ">= 0 and temperature > 0")
        self.d, self.weight, self.diversity = latent_dim, entropy_weight, diversity
        self.temperature, self.beta = temperature, commitment
        bits = (torch.arange(2 ** latent_dim).unsqueeze(1) >> torch.arange(latent_dim)) & 1
        self.register_buffer("bits", bits.float(), persistent=False)  # [K, D], bit d of k

    @property
    def classes(self) -> int:
        return 2 ** self.d

    def forward(self, h: torch.Tensor) -> Quantized:
        ze = h.float()
        return Quantized(ze, torch.where(ze > 0, 1.0, -1.0), self.signs(ze))

    def signs(self, maps: torch.Tensor) -> torch.Tensor:
        """The code of each position: the binary number of its channels' signs."""
        weights = (2 ** torch.arange(self.d, device=maps.device)).view(-1, 1, 1)
        return ((maps > 0).long() * weights).sum(1)

    def entropies(self, ze: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean entropy of q(c | z) over positions, and the entropy of its mean. With
        codes in {-1, 1}^D, |z - c|^2 differs between c_d = +1 and -1 by 4 z_d, so q
        factorises: q(c_d = 1 | z) = sigmoid(4 z_d / temperature)."""
        logits = 4 * ze.movedim(1, -1).reshape(-1, self.d) / self.temperature
        up, down = F.logsigmoid(logits), F.logsigmoid(-logits)  # log q(c_d = +-1)
        per = -(up.exp() * up + down.exp() * down).sum(1).mean()
        log_q = up @ self.bits.T + down @ (1 - self.bits).T  # [M, K]
        mean = log_q.exp().mean(0)
        return per, -(mean * torch.log(mean.clamp_min(1e-12))).sum()

    def terms(self, q: Quantized) -> dict[str, torch.Tensor]:
        per, batch = self.entropies(q.ze)
        commit = (q.ze - q.zq).pow(2).flatten(1).sum(1).mean()
        penalty = self.weight * (per - self.diversity * batch) + self.beta * commit
        return {"penalty": penalty, "commit": commit.detach(), "entropy": per.detach(),
                "batch_entropy": batch.detach(), **usage(q.indices, self.classes)}

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return self.signs(z.float().view(len(z), self.d, *self.hw))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        return (self.bits[indices] * 2 - 1).movedim(-1, 1).flatten(1)

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return torch.where(z > 0, 1.0, -1.0)
