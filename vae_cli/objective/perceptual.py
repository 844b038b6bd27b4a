"""``loss=perceptual``: the reconstruction loss of latent-diffusion autoencoders (Rombach et
al. 2022, the latent-diffusion code's ``LPIPSWithDiscriminator``), as one likelihood.

Per example, in the [-1, 1] units of that code (D = C x H x W values):

    nll = (sum_i |x_i - x_hat_i| + perceptual_weight * D * LPIPS(x, x_hat)) / e^logvar + D logvar

(``pixel=l2``: squared differences). LPIPS is added at every pixel, as that code does, so
the published weights mean the same here. ``logvar`` is fixed unless ``learn_logvar``:
that code declares it a parameter but its optimizer leaves it out by default.

With ``disc_weight`` > 0 a PatchGAN discriminator D (Isola et al. 2017, the latent-
diffusion code's 3-layer one) trains on x (real) against x_hat (fake) through the auxiliary
protocol (objective/auxiliary.py) with its own Adam, from main step ``disc_start`` on,
and the loss gains w * G, G the generator loss of D's logits at x_hat and

    w = disc_weight * clamp(||grad_L nll|| / (||grad_L G|| + 1e-4), 0, 1e4),

the adaptive weight at the decoder's last layer L, taken as a constant. ``disc_loss``:
``hinge`` (D: mean relu(1 - D(x)) + relu(1 + D(x_hat)), halved; G: -mean D(x_hat)) or
``non_saturating`` (D: the logistic loss, halved; G: mean softplus(-D(x_hat))).

This is not a density (``density`` is False): `vae eval` reports no bound in nats for it,
and the importance-weighted bound is refused in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.errors import UserError
from vae_cli.objective.auxiliary import Detached
from vae_cli.objective.likelihoods import Likelihood

PIXEL = ("l1", "l2")
DISC_LOSSES = ("hinge", "non_saturating")


class PatchDiscriminator(nn.Sequential):
    """pix2pix's N-layer PatchGAN: 4x4 convolutions, each of the first ``layers`` halving
    the image and doubling the width (at most 8 x ``ch``), BatchNorm and LeakyReLU 0.2,
    then one logit per overlapping patch. Weights drawn as in that code: N(0, 0.02) for
    convolutions, N(1, 0.02) for BatchNorm scales."""

    def __init__(self, channels: int, ch: int = 64, layers: int = 3):
        mods: list[nn.Module] = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ch
        for n in range(1, layers + 1):
            out = ch * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out),
                     nn.LeakyReLU(0.2)]
            width = out
        super().__init__(*mods, nn.Conv2d(width, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def patches(size: int, layers: int) -> int:
        """The side of its logit map for images of side ``size`` (< 1: too small)."""
        for _ in range(layers):
            size //= 2
        return size - 2  # two 4x4 convolutions of stride 1 and padding 1


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """D's loss on the logits of real and reconstructed images."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The decoder's adversarial loss on the logits of its reconstructions."""
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def adaptive_weight(nll: torch.Tensor, g: torch.Tensor, last: nn.Parameter) -> torch.Tensor:
    """||grad_last nll|| / (||grad_last g|| + 1e-4), clamped to [0, 1e4], a constant."""
    (gn,) = torch.autograd.grad(nll, last, retain_graph=True)
    (gg,) = torch.autograd.grad(g, last, retain_graph=True)
    return (gn.norm() / (gg.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class Perceptual(Likelihood):
    option = "perceptual"
    density = False
    logged = "d_loss"

    def __init__(self, pixel: str = "l1", perceptual_weight: float = 1.0,
                 lpips: str | None = "torchvision", logvar: float = 0.0,
                 learn_logvar: bool = False, disc_weight: float = 0.5,
                 disc_start: int = 50001, disc_loss: str = "hinge", disc_layers: int = 3,
                 disc_ch: int = 64, disc_lr: float = 4.5e-6,
                 disc_betas: tuple[float, float] = (0.5, 0.9),
                 *, shape: tuple[int, ...]):
        super().__init__()
        check(pixel, perceptual_weight, lpips, disc_weight, disc_start, disc_loss,
              disc_layers, disc_ch, disc_lr, shape)
        self.pixel, self.perceptual_weight = pixel, float(perceptual_weight)
        value = torch.tensor(float(logvar))
        if learn_logvar:
            self.logvar = nn.Parameter(value)
        else:
            self.register_buffer("logvar", value)
        # the frozen LPIPS network is kept out of the state dict (weights the user has),
        # loaded when a loss is first needed: sampling or exporting a model needs none
        self.lpips, self.__dict__["loaded"] = lpips, None
        self.disc_weight, self.disc_loss = float(disc_weight), disc_loss
        self.disc_lr, self.disc_betas = float(disc_lr), tuple(disc_betas)
        if self.disc_weight:
            # drawn from a stream of its own: the model's initial weights are the same with
            # or without a discriminator, so runs differ only where its term enters
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(torch.initial_seed())
                self.discriminator = PatchDiscriminator(shape[0], disc_ch, disc_layers)
            self.discriminator.requires_grad_(False)  # trained by the auxiliary step only
            self.auxiliary_steps, self.auxiliary_start = 1, int(disc_start)

    def ready(self) -> None:
        if self.perceptual_weight and self.loaded is None:
            from vae_cli.nets.lpips import lpips_network

            self.__dict__["loaded"] = lpips_network(self.lpips)

    @property
    def lpips_net(self) -> nn.Module | None:
        self.ready()
        return self.loaded

    def distance(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """LPIPS per example for any leading dims, [...]: images in [0, 1]."""
        from vae_cli.nets.lpips import lpips_distance

        net = self.lpips_net
        if next(net.parameters()).device != out.device:
            net.to(out.device)
        lead = out.shape[:-3]
        a = out.reshape(-1, *out.shape[-3:])
        b = x.expand_as(out).reshape(-1, *out.shape[-3:])
        return lpips_distance(net, a, b).view(lead)

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = out.float()
        diff = 2 * (out - x)  # in [-1, 1] units
        rec = diff.abs() if self.pixel == "l1" else diff.pow(2)
        dims = math.prod(out.shape[-3:])
        per = rec.flatten(-3).sum(-1)
        if self.perceptual_weight:
            per = per + self.perceptual_weight * dims * self.distance(out, x)
        return per * torch.exp(-self.logvar) + dims * self.logvar

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.float().clamp(0, 1)

    def adversarial(self, out: torch.Tensor, recon: torch.Tensor,
                    last_layer: Callable[[], nn.Parameter], step: int | None
                    ) -> dict[str, torch.Tensor]:
        if not self.disc_weight or step is None:  # outside training: the nll alone
            return {}
        zero = recon.detach().new_zeros(())
        if step < self.auxiliary_start:
            return {"adv": zero, "g_loss": zero, "d_weight": zero}
        g = generator_loss(self.discriminator(out * 2 - 1).float(), self.disc_loss)
        w = self.disc_weight * adaptive_weight(recon, g, last_layer())
        return {"adv": w * g, "g_loss": g.detach(), "d_weight": w}

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.disc_weight else []

    def auxiliary_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.auxiliary_parameters(), lr=self.disc_lr,
                                betas=self.disc_betas)

    def auxiliary_loss(self, batch: Detached) -> torch.Tensor:
        real = self.discriminator(batch.x * 2 - 1).float()
        fake = self.discriminator(batch.out.float() * 2 - 1).float()
        return discriminator_loss(real, fake, self.disc_loss)


def check(pixel: str, perceptual_weight: float, lpips: str | None, disc_weight: float,
          disc_start: int, disc_loss: str, disc_layers: int, disc_ch: int, disc_lr: float,
          shape: tuple[int, ...]) -> None:
    """Each setting's own range, one line each."""
    if pixel not in PIXEL:
        raise UserError(f"loss.pixel={pixel!r} is not one of {PIXEL}")
    if disc_loss not in DISC_LOSSES:
        raise UserError(f"loss.disc_loss={disc_loss!r} is not one of {DISC_LOSSES}")
    if perceptual_weight < 0 or disc_weight < 0 or disc_start < 0:
        raise UserError("loss.perceptual_weight, loss.disc_weight and loss.disc_start must "
                        "be >= 0")
    if perceptual_weight and not lpips:
        raise UserError("loss.perceptual_weight > 0 needs loss.lpips (torchvision, or a file "
                        "of an LPIPS state dict); loss.perceptual_weight=0 drops the term")
    if len(shape) != 3:
        raise UserError("loss=perceptual scores images")
    if disc_weight and (disc_layers < 1 or disc_ch < 1 or not disc_lr > 0):
        raise UserError("loss.disc_layers, loss.disc_ch and loss.disc_lr must be > 0")
    if disc_weight and PatchDiscriminator.patches(min(shape[1:]), disc_layers) < 1:
        raise UserError(f"images of {shape[1]} x {shape[2]} are too small for a "
                        f"{disc_layers}-layer PatchGAN (each layer halves them); lower "
                        "loss.disc_layers")
