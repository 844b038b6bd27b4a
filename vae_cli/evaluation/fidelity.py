"""How close an image model's reconstructions are to its inputs, as image autoencoders are
compared (latent diffusion's table: PSNR, SSIM): the decoded posterior mean of each image
against the image, pixels in [0, 1].

- PSNR: 10 log10(1 / MSE) per image, averaged over images (dB).
- SSIM (Wang et al. 2004): an 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01,
  K2 = 0.03, data range 1, valid positions only, averaged over channels and positions, then
  images: the settings of the paper, scikit-image (``gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False``) and torchmetrics' default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae_cli.data.batching import labelled
from vae_cli.objective.model import VAE

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] dB between images in [0, 1] ([B, C, H, W]); identical images give inf."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] structural similarity of images in [0, 1] [B, C, H, W] (see the module); images
    smaller than the window use a window of their size."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    size = min(WINDOW, a.shape[-1], a.shape[-2])
    w = gaussian_window(size, SIGMA * size / WINDOW).to(a.device).expand(c, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = K1**2, K2**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / \
        ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def fidelity(model: VAE, x: torch.Tensor, means: torch.Tensor, batch_size: int,
             labels: torch.Tensor | None = None, lpips: str | None = None
             ) -> dict[str, float]:
    """Mean PSNR and SSIM of the reconstructions of a split (image models), and LPIPS
    with the ``lpips`` weights when given (nets.lpips). The reconstructions are decoded
    from the posterior means already computed for the split (``means``, as ``encode_all``
    gives them): the encoder does not run over the split again."""
    def decoded(i: int, xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
        mu = means[i * batch_size:(i + 1) * batch_size].to(xb.device)
        return model.generate(mu, y=yb)
    return image_scores(model, x, labels, batch_size, decoded, lpips)


@torch.no_grad()
def fidelity_any_size(model: VAE, x: torch.Tensor, batch_size: int, tile: int,
                      lpips: str | None = None) -> dict[str, float]:
    """The same scores for images of another size than the training one (model=ldm),
    encoded and decoded in tiles of ``tile`` px; keys end in ``_<size>px``."""
    from vae_cli.nets.ldm import reconstruct_any_size

    def decoded(i: int, xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
        return model.likelihood.mean(reconstruct_any_size(model.decoder, xb, tile))
    scores = image_scores(model, x, None, batch_size, decoded, lpips)
    return {f"{k}_{x.shape[-1]}px": v for k, v in scores.items()}


def image_scores(model: VAE, x: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 decoded, lpips: str | None) -> dict[str, float]:  # noqa: ANN001
    """PSNR, SSIM (and LPIPS) of ``decoded(i, xb, yb)``, batch i's reconstructions."""
    net = None
    if lpips is not None:
        from vae_cli.nets.lpips import lpips_distance, lpips_network

        net = lpips_network(lpips).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    sums, n = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}, 0
    for i, (xb, yb) in enumerate(labelled(x, labels, batch_size)):
        r = decoded(i, xb, yb).clamp(0, 1)
        sums["psnr"] += float(psnr(r, xb).clamp(max=100).sum())  # a copy: 100 dB, not inf
        sums["ssim"] += float(ssim(r, xb).sum())
        if net is not None:
            sums["lpips"] += float(lpips_distance(net, r, xb).sum())
        n += len(xb)
    model.train(was_training)
    if net is None:
        del sums["lpips"]
    return {k: v / n if n else math.nan for k, v in sums.items()}
