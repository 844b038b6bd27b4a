"""dSprites-style binary sprites rendered procedurally: the offline default dataset.

Factors follow dSprites (Matthey et al. 2017): shape {square, ellipse, heart}, 6 scales in
[0.5, 1], 40 orientations in [0, 2pi), 32 x 32 positions, each drawn uniformly per example.
Unlike dSprites the images are sampled, not the full 737,280-image product, and any size >= 16
works. Rendering is vectorised in torch: each sprite is evaluated only on a patch just larger
than its enclosing circle, supersampled 4x4 and thresholded at half coverage (clean binary
edges); 24k images at 32x32 take ~0.4 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from vae_cli.data.base import ImageData, check_positive, load_cache
from vae_cli.errors import UserError
from vae_cli.runtime.files import save_cache

log = logging.getLogger(__name__)

FACTOR_NAMES = ["shape", "scale", "orientation", "posX", "posY"]
# Radius of the circle enclosing the largest sprite, in half-frame units: large enough that the
# smallest (scale 0.5) sprites still span ~7 px at 32x32.
R_MAX = 0.5
SUPERSAMPLE = 4
RENDER_VERSION = 2  # bump when the drawing changes, so stale caches are not reused


def factor_grids() -> list[torch.Tensor]:
    """The value grid of each factor, in float64 so cos/sin are exact before the cast."""
    return [
        torch.arange(3, dtype=torch.float64),
        torch.linspace(0.5, 1.0, 6, dtype=torch.float64),
        torch.arange(40, dtype=torch.float64) * (2 * math.pi / 40),
        torch.linspace(0.0, 1.0, 32, dtype=torch.float64),
        torch.linspace(0.0, 1.0, 32, dtype=torch.float64),
    ]


def sample_factors(n: int, generator: torch.Generator) -> torch.Tensor:
    """float64 [n, 5]: shape index, scale, orientation (rad), posX, posY (both in [0, 1])."""
    cols = [g[torch.randint(len(g), (n,), generator=generator)] for g in factor_grids()]
    return torch.stack(cols, dim=1)


def _heart_geometry(d: float = 0.5, r: float = 0.5, h: float = 1.2) -> dict[str, float]:
    """A heart as the convex hull of two touching discs (centres (+-d, 0), radius r) and a tip
    (0, -h): the deep notch between the discs keeps it recognisable at 32x32 when rotated,
    which the smooth implicit heart curve was not. Returns the outer tangent line from the tip
    (unit normal nx, ny and offset), the tangent point's height, and the enclosing circle
    (centre (0, cy), radius R), whose closed form solves cy + h = hypot(d, cy) + r."""
    length, alpha = math.hypot(d, h), math.asin(r / math.hypot(d, h))
    phi = math.atan2(h, d) - alpha  # direction of the tangent line, seen from the tip
    nx, ny = math.sin(phi), -math.cos(phi)
    cy = (d * d - (h - r) ** 2) / (2 * (h - r))
    return {"d": d, "r": r, "nx": nx, "ny": ny, "off": -ny * h, "R": cy + h, "cy": cy,
            "ty": -h + math.sqrt(length**2 - r * r) * math.sin(phi)}


HEART = _heart_geometry()


def _inside(shape: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Implicit inequalities in a frame where every shape's enclosing circle is the unit
    circle centred on the origin, so rotations never leave it (y points up)."""
    if shape == 0:  # square: half side 1/sqrt(2) puts its corners on the unit circle
        return torch.maximum(x.abs(), y.abs()) <= 1 / math.sqrt(2)
    if shape == 1:  # ellipse with a 2:1 axis ratio, major axis horizontal at orientation 0
        return x * x + 4 * y * y <= 1
    g = HEART  # symmetric about x = 0, so work with |x|
    hx, hy = g["R"] * x.abs(), g["R"] * y + g["cy"]
    disc = (hx - g["d"]) ** 2 + hy * hy <= g["r"] ** 2
    # Below the disc centres: inside the tangent line from the tip; above the tangent point
    # the discs themselves are the boundary, so only the strip between the centres is added.
    tangent = g["nx"] * hx + g["ny"] * hy <= g["off"]
    below = (hy <= 0) & tangent & ((hx <= g["d"]) | (hy <= g["ty"]))
    return disc | below


def render(factors: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [n, 1, S, S] of 0/255 for factors as produced by sample_factors."""
    n, s, ss = len(factors), image_size, SUPERSAMPLE
    half = s / 2
    travel = half * (1 - R_MAX) - 1  # keep a 1-pixel empty border, like dSprites' margins
    cx = half + (2 * factors[:, 3] - 1) * travel
    cy = half + (2 * factors[:, 4] - 1) * travel  # posY 0 is the top row
    rad = factors[:, 1] * R_MAX * half
    cos, sin = factors[:, 2].cos().float(), factors[:, 2].sin().float()
    out = torch.zeros(n, s, s, dtype=torch.uint8)
    # One group per (shape, scale): each sprite is evaluated only on a patch just larger than
    # its enclosing circle, ~1/4 of the frame at the largest scale and less below it.
    for key in torch.unique(factors[:, :2], dim=0):
        group = (factors[:, :2] == key).all(1).nonzero().squeeze(1)
        patch = math.ceil(2 * key[1].item() * R_MAX * half) + 2
        chunk = max(1, 2**21 // (patch * ss) ** 2)  # ~8 MB float temporaries: cache friendly
        offsets = (torch.arange(patch * ss, dtype=torch.float64) + 0.5) / ss
        for idx in group.split(chunk):
            # Patch origins are clamped into the frame; the sprite still fits in the patch
            # because it is inside the frame and at most patch-2 pixels wide.
            ox = torch.floor(cx[idx] - patch / 2).long().clamp(0, s - patch)
            oy = torch.floor(cy[idx] - patch / 2).long().clamp(0, s - patch)
            r = rad[idx, None]
            # Per-axis coordinates in units of the sprite radius, y up; rotating by
            # -orientation then costs one full-size add per axis (outer sums of 1-D terms).
            dx = ((ox[:, None] + offsets - cx[idx, None]) / r).float()
            dy = (-(oy[:, None] + offsets - cy[idx, None]) / r).float()
            c, si = cos[idx, None], sin[idx, None]
            xr = (c * dx)[:, None, :] + (si * dy)[:, :, None]
            yr = (c * dy)[:, :, None] - (si * dx)[:, None, :]
            inside = _inside(int(key[0]), xr, yr).view(torch.uint8)
            counts = inside.view(len(idx), patch, ss, patch, ss).sum((2, 4), dtype=torch.uint8)
            ar = torch.arange(patch)
            rows = (oy[:, None] + ar)[:, :, None]
            cols = (ox[:, None] + ar)[:, None, :]
            # >= half of the subsamples covered; the patches of one chunk never overlap.
            out[idx[:, None, None], rows, cols] = (counts >= ss * ss // 2).to(torch.uint8) * 255
    return out.unsqueeze(1)


class ShapesOracle:
    """Renders any combination of grid positions: the ground truth the intervention metrics
    sample from (the full product of the grids, which the dataset itself only samples)."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.grids = factor_grids()
        self.sizes = tuple(len(g) for g in self.grids)

    def observe(self, classes: torch.Tensor) -> torch.Tensor:
        values = torch.stack([g[classes[:, k].cpu()] for k, g in enumerate(self.grids)], 1)
        return render(values, self.image_size)


def _generate(image_size: int, n_total: int, seed: int) -> dict[str, torch.Tensor]:
    factors = sample_factors(n_total, torch.Generator().manual_seed(seed))
    return {"images": render(factors, image_size), "factors": factors.float()}


def shapes(
    root: str = "data",
    image_size: int = 32,
    n_train: int = 20000,
    n_val: int = 2000,
    n_test: int = 2000,
    seed: int = 0,
    cache: bool = True,
) -> ImageData:
    check_positive(n_train=n_train, n_val=n_val, n_test=n_test)
    if image_size < 16:
        raise UserError(f"dataset.image_size must be >= 16 for recognisable sprites, "
                        f"got {image_size}")
    n_total = n_train + n_val + n_test
    key = {"v": RENDER_VERSION, "size": image_size, "n": [n_train, n_val, n_test], "seed": seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(root).expanduser() / "shapes" / f"shapes_{digest}.pt"
    data = load_cache(path) if cache else None
    if data is None or set(data) != {"images", "factors"} or len(data["images"]) != n_total:
        data = _generate(image_size, n_total, seed)
        if cache:
            save_cache(path, data, "the dataset cache", "continuing without it")
    else:
        log.info("loaded cached shapes from %s", path)
    images, factors = data["images"], data["factors"]
    bounds = [0, n_train, n_train + n_val, n_total]
    sl = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(("train", "val", "test"))}
    return ImageData(
        name="shapes",
        train=images[sl["train"]], val=images[sl["val"]], test=images[sl["test"]],
        labels={s: factors[v, 0].long() for s, v in sl.items()},
        factors={s: factors[v] for s, v in sl.items()},
        factor_names=list(FACTOR_NAMES),
        oracle=ShapesOracle(image_size),
    )
