"""The Fréchet distance between generated and real images, FID's formula over features of
another network (see features.py: vae's own, or a user-supplied torchvision classifier):

    FD = ||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2})

for the means and covariances of the two sets of features (Heusel et al. 2017). With vae's
own features the number is comparable between models of the same dataset, and never to
published Inception FIDs.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vae_cli.evaluation.features import Extractor
from vae_cli.objective.model import VAE
from vae_cli.runtime.progress import bar


class Draws(Protocol):
    """What a sample score needs of a sampler (samplers/ build them; this module only draws)."""

    name: str

    def sample(self, n: int) -> torch.Tensor: ...


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (unbiased; zero for a single row), in float64."""
    f = features.detach().double().reshape(len(features), -1)
    mean = f.mean(0)
    centred = f - mean
    cov = centred.T @ centred / max(len(f) - 1, 1)
    return mean, cov


def psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, from its
    eigendecomposition (rounding's small negative eigenvalues clipped to zero)."""
    vals, vecs = torch.linalg.eigh((c + c.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor,
                     c2: torch.Tensor) -> float:
    """||m1 - m2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^{1/2}). C1 C2 is not symmetric, but it
    is similar to S C2 S with S = C1^{1/2}, which is symmetric PSD: the same eigenvalues,
    so Tr((C1 C2)^{1/2}) is the sum of the square roots of eigvalsh(S C2 S). No complex
    sqrtm, no imaginary residue to discard, symmetric in its arguments up to rounding."""
    m1, c1, m2, c2 = (t.double() for t in (m1, c1, m2, c2))
    s = psd_sqrt(c1)
    inner = s @ c2 @ s
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2 * trace_sqrt
    return max(float(fd), 0.0)


def frechet_of(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussian fits of two sets of feature rows."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


@torch.no_grad()
def generate(model: VAE, sampler: Draws, n: int, batch: int,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """n images decoded from the sampler's draws (a conditional model decodes each under a
    class drawn from ``labels``, the training labels, so the class mix matches the data)."""
    out, progress = [], bar(n, "decoding samples", unit="images")
    for i in range(0, n, batch):
        m = min(batch, n - i)
        progress.update(m)
        z = sampler.sample(m)
        y = None if labels is None else labels[torch.randint(len(labels), (m,),
                                                             device=labels.device)]
        out.append(model.generate(z, y=y).float())
    progress.close()
    return torch.cat(out)


@torch.no_grad()
def fd_score(model: VAE, sampler: Draws, real: torch.Tensor, extractor: Extractor,
             n: int, batch: int = 500, labels: torch.Tensor | None = None) -> dict:
    """The Fréchet distance between ``n`` generated images and the real images given
    (uint8, as the dataset holds them), under the extractor's features, with what it is."""
    fake = extractor.features(generate(model, sampler, n, batch, labels), batch)
    ref = extractor.features(real.float() / 255, batch)
    return {extractor.key: frechet_of(fake, ref), "fd_features": extractor.description,
            "fd_sampler": sampler.name, "fd_samples": n, "fd_real": len(real)}


@torch.no_grad()
def reconstruction_fd(model: VAE, real: torch.Tensor, extractor: Extractor, batch: int = 500,
                      labels: torch.Tensor | None = None) -> dict:
    """The Fréchet distance between the reconstructions of the real images (uint8) and the
    images themselves: an autoencoder's rFID under these features."""
    recon = torch.cat([model.reconstruct(real[i:i + batch].float() / 255,
                                         None if labels is None else labels[i:i + batch])
                       for i in range(0, len(real), batch)])
    ref = extractor.features(real.float() / 255, batch)
    return {"r" + extractor.key: frechet_of(extractor.features(recon, batch), ref)}
