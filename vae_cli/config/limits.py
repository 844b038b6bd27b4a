"""Resource bounds: values past which a setting would cost hours or gigabytes for what is
almost always a typo (``posterior.steps=100000`` builds 58M parameters; ``eval.iw_samples=1e8``
decodes each test image 10^8 times). Each is refused before any work, in one line that
names the key, the bound and the override lifting every bound: ``limits=false``. The bounds
sit an order of magnitude past the largest published setting of each key."""

from __future__ import annotations

import math

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_cli.errors import UserError

LIFT = "limits=false lifts the bounds"

# key: (bound, what each unit costs); a key absent from a command's config is not checked.
BOUNDS: dict[str, tuple[int, str]] = {
    "posterior.steps": (256, "flow steps, each with per-example parameters"),
    "trainer.iw_samples": (5_000, "decoder passes per training example and step"),
    "trainer.num_images": (1_024, "images in each picture grid, every image_every epochs"),
    "eval.iw_samples": (100_000, "decoder passes per evaluated example"),
    "eval.mig_bins": (10_000, "histogram bins per latent and factor"),
    "num_samples": (10_000, "images in one PNG grid"),
    "fd.samples": (200_000, "generated images scored"),
    "fd.epochs": (1_000, "epochs training the feature network"),
    "sampler.components": (10_000, "mixture components fitted to the codes"),
    "sampler.epochs": (10_000, "epochs training the sampler"),
    # 10x MAGVIT-v2's 2^18 codes
    "posterior.codes": (2_621_440, "codebook vectors each encoder output is compared with"),
    "posterior.levels": (2_621_440, "codes, their product, whose use is counted every step"),
}

# Ten times the largest image autoencoder the field trains (latent diffusion's, 84M).
MAX_PARAMETERS = 1_000_000_000


def check(cfg: DictConfig) -> None:
    """Refuse the first key of ``cfg`` past its bound, unless ``limits=false``."""
    if not cfg.get("limits", True):
        return
    for key, (bound, cost) in BOUNDS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if _count(value) > bound:
            raise UserError(f"{key}={value} is past its bound {bound:,} ({cost}); {LIFT}")


def _count(value: object) -> int:
    """An integer setting, or the product of a list of them (0 for anything else: the
    component that reads it refuses it)."""
    if isinstance(value, ListConfig) and value:
        return math.prod(_count(v) for v in value)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def check_parameters(count: int | None, cfg: DictConfig) -> None:
    """Refuse a model past MAX_PARAMETERS (a width or depth typo), unless ``limits=false``
    (None: not known yet)."""
    if cfg.get("limits", True) and count is not None and count > MAX_PARAMETERS:
        raise UserError(f"the model has {count:,} parameters, past the bound "
                        f"{MAX_PARAMETERS:,} (model.* widths, depths or latent sizes); {LIFT}")
