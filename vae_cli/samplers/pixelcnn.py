"""A gated PixelCNN over a grid of discrete latent codes, fitted after training as the prior
that samples them (VQ-VAE, van den Oord et al. 2017).

A discrete-latent VAE trains with a uniform prior over its H x W grid of codes from K
classes; the codes the encoder actually uses are far from uniform and far from independent,
so decoding uniform draws gives noise. The fix is an autoregressive model of the training
split's codes, p(c) = prod_(i, j) p(c_ij | codes before (i, j) in raster order), and sampling
from it one position at a time.

The network is the gated PixelCNN of van den Oord et al. 2016 ("Conditional Image Generation
with PixelCNN Decoders"): a vertical stack that sees the rows above (and, before a one-row
shift down, its own row) and a horizontal stack that sees the current row to the left. Both
are causal by construction: convolutions padded on the top and left only, then shifted, so
no output ever reads an input at or after its own position and no masks are needed. Unlike
the masked PixelCNN, the two stacks together leave no blind spot: every earlier position is
within reach once there are enough layers.

The sampler's model prior is reached through this protocol only: ``grid`` (H, W),
``classes`` K, ``latent_dim``, ``codes(z) -> [N, H, W]`` and ``embed(idx) -> [N, latent_dim]``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vae_cli.errors import UserError
from vae_cli.runtime.progress import counted
from vae_cli.samplers.base import Sampler, check_settings

log = logging.getLogger(__name__)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i gets row i - 1 (zeros in row 0): what the vertical stack saw up to and
    including its own row becomes strictly above the row it feeds."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Column j gets column j - 1 (zeros in column 0): the first layer must not read the
    code it predicts."""
    return F.pad(x, (1, 0))[..., :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b), the gated activation of the paper."""
    a, b = x.chunk(2, 1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer. The vertical conv (k//2 + 1, k) is padded k//2 rows on top and none
    below, so output row i reads rows i - k//2 .. i; the horizontal conv (1, k//2 + 1) is
    padded on the left only, so output column j reads columns j - k//2 .. j. ``first``: the
    horizontal input is shifted one column right (the "A" restriction: not the current
    position) and there is no residual, since the input is the codes themselves."""

    def __init__(self, channels: int, kernel: int, first: bool):
        super().__init__()
        self.half, self.first = kernel // 2, first
        c = channels
        self.vertical = nn.Conv2d(c, 2 * c, (self.half + 1, kernel))
        self.horizontal = nn.Conv2d(c, 2 * c, (1, self.half + 1))
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.vertical(F.pad(v, (self.half, self.half, self.half, 0)))
        h_in = shift_right(h) if self.first else h
        h_pre = self.horizontal(F.pad(h_in, (self.half, 0))) + self.v_to_h(shift_down(v_pre))
        h_new = self.h_out(gate(h_pre))
        return gate(v_pre), h_new if self.first else h + h_new


class GatedPixelCNN(nn.Module):
    """Codes [B, H, W] (long, in [0, K)) -> logits [B, K, H, W]; the logits at (i, j) depend
    only on the codes strictly before (i, j) in raster order."""

    def __init__(self, classes: int, grid: tuple[int, int], channels: int = 64,
                 layers: int = 6, kernel: int = 5):
        super().__init__()
        self.classes, self.grid = classes, (int(grid[0]), int(grid[1]))
        self.embedding = nn.Embedding(classes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel, first=i == 0)
                                    for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, classes, 1))

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The codes' embeddings [B, C, H, W]: the float input ``from_embedding`` reads."""
        return self.embedding(idx).permute(0, 3, 1, 2)

    def from_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, H, W] from embedded codes [B, C, H, W] (differentiable in x, which
        is what lets the causal structure be checked by gradients)."""
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.from_embedding(self.embed(idx))

    def nll(self, idx: torch.Tensor) -> torch.Tensor:
        """-log p(idx) in nats per grid, [B]: the cross-entropy summed over positions."""
        return F.cross_entropy(self(idx), idx, reduction="none").sum((1, 2))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """[n, H, W] codes drawn in raster order, one forward pass per position, from the
        global torch generator. Row i's logits read nothing below row i, so each pass
        only runs over the rows filled so far (the same logits, less work)."""
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        rows, cols = self.grid
        device = self.embedding.weight.device
        idx = torch.zeros(n, rows, cols, dtype=torch.long, device=device)
        for i in range(rows):
            for j in range(cols):
                logits = self(idx[:, :i + 1])[:, :, i, j].float() / temperature
                idx[:, i, j] = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        return idx


def protocol_problem(prior: Any) -> str | None:
    """What keeps ``prior`` from being a grid of discrete codes, or None."""
    for attr in ("grid", "classes", "latent_dim", "codes", "embed"):
        if not hasattr(prior, attr):
            return f"it has no {attr}"
    if not (callable(prior.codes) and callable(prior.embed)):
        return "its codes and embed are not methods"
    grid = prior.grid
    if not (isinstance(grid, tuple | list) and len(grid) == 2
            and all(_positive_int(g) for g in grid)):
        return f"its grid {grid!r} is not (rows, cols)"
    if not _positive_int(prior.classes):
        return f"its classes {prior.classes!r} is not a positive integer"
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out) of n grids: a seeded permutation, ``fraction`` of them held
    out (at least one when fraction > 0)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = 0 if fraction == 0 else max(1, round(n * fraction))
    return perm[held:], perm[:held]


class PixelCNNSampler(Sampler):
    """A gated PixelCNN fitted to the training split's codes (``prior.codes`` of the
    posterior means), trained with Adam for ``epochs`` passes of shuffled minibatches;
    ``val_fraction`` of the grids are held out and the weights of the epoch with the lowest
    held-out NLL are kept (0: none held out, the last epoch's are kept). Sampling draws the
    codes in raster order (logits divided by ``temperature``) and returns their latent
    vectors ``prior.embed(codes)``, what the decoder reads."""

    name = "pixelcnn"
    density = True

    def __init__(self, channels: int = 32, layers: int = 6, kernel: int = 5, epochs: int = 10,
                 batch_size: int = 128, lr: float = 1e-3, temperature: float = 1.0,
                 val_fraction: float = 0.05, seed: int = 0, *, latent_dim: int = 1,
                 prior: Any = None):
        super().__init__(latent_dim)
        check_settings(seed, channels=channels, layers=layers, epochs=epochs, batch_size=batch_size,
               lr=lr, temperature=temperature)
        for key, value in (("lr", lr), ("temperature", temperature)):
            if not math.isfinite(value):
                raise UserError(f"sampler.{key}={value} must be finite")
        if not _positive_int(kernel) or kernel < 3 or kernel % 2 == 0:
            raise UserError(f"sampler.kernel={kernel} must be an odd integer >= 3")
        if isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
            raise UserError(f"sampler.val_fraction={val_fraction} must be in [0, 1)")
        self.channels, self.n_layers, self.kernel = channels, layers, kernel
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.temperature, self.val_fraction, self.seed = temperature, val_fraction, seed
        self.history: list[dict[str, float]] = []
        self.net: GatedPixelCNN | None = None
        # Bound methods, not the prior itself: its weights belong to the model, not here.
        self._codes = self._embed = None
        if prior is not None:
            self._bind(prior)

    def _bind(self, prior: Any) -> None:
        problem = protocol_problem(prior)
        if problem:
            raise UserError(f"sampler=pixelcnn needs a discrete latent (posterior=vq, fsq or "
                            f"posterior=gumbel); this model's prior, "
                            f"{type(prior).__name__}, is not a grid of codes ({problem})")
        if prior.latent_dim != self.latent_dim:
            raise UserError(f"sampler=pixelcnn: the prior's latent_dim {prior.latent_dim} is "
                            f"not the model's {self.latent_dim}")
        self.grid, self.classes = (int(prior.grid[0]), int(prior.grid[1])), prior.classes
        self._codes, self._embed = prior.codes, prior.embed
        self.net = GatedPixelCNN(self.classes, self.grid, self.channels, self.n_layers,
                                 self.kernel)

    def _need_prior(self) -> GatedPixelCNN:
        if self.net is None:
            raise ValueError("PixelCNNSampler was built without a prior")
        return self.net

    def fit(self, mu: torch.Tensor, std: torch.Tensor) -> None:
        net = self._need_prior()
        self.check_codes(mu)
        device = net.embedding.weight.device
        with torch.no_grad():
            idx = self._codes(mu.detach()).to(device, torch.long)
        self._check_indices(idx)
        train, held = split(len(idx), self.val_fraction, self.seed)
        if len(train) == 0:
            raise UserError(f"sampler.val_fraction={self.val_fraction} leaves none of the "
                            f"{len(idx)} training grids to fit to")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            net.reset_parameters()
            self._train(idx[train.to(device)], idx[held.to(device)])
        self.eval()

    def _check_indices(self, idx: torch.Tensor) -> None:
        shape = (len(idx), *self.grid)
        if tuple(idx.shape) != shape:
            raise UserError(f"sampler=pixelcnn: the prior's codes have shape "
                            f"{tuple(idx.shape)}, expected {list(shape)}")
        if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < self.classes):
            raise UserError(f"sampler=pixelcnn: the prior's codes leave [0, {self.classes})")

    def _train(self, train: torch.Tensor, held: torch.Tensor) -> None:
        net, self.history = self.net, []
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        best, best_state = math.inf, None
        for epoch in counted(self.epochs, "fitting sampler=pixelcnn", unit="epochs"):
            net.train()
            order = torch.randperm(len(train), device=train.device)
            total = 0.0
            for batch in order.split(self.batch_size):
                loss = net.nll(train[batch]).mean()
                if not torch.isfinite(loss):
                    raise UserError("sampler=pixelcnn: the PixelCNN's loss became non-finite; "
                                    "lower sampler.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(batch)
            record = {"epoch": epoch + 1, "train": total / len(train)}
            if len(held):
                record["val"] = self.mean_nll(held)
                if record["val"] < best:
                    best = record["val"]
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            self.history.append(record)
            self._log(record)
        if best_state is not None:
            net.load_state_dict(best_state)

    @torch.no_grad()
    def mean_nll(self, idx: torch.Tensor, batch: int = 512) -> float:
        """Mean -log p in nats per grid of codes [N, H, W], in eval mode."""
        net = self._need_prior()
        net.eval()
        total = sum(float(net.nll(part).sum()) for part in idx.split(batch))
        return total / len(idx)

    def _log(self, record: dict[str, float]) -> None:
        per_bit = math.log(2) * self.grid[0] * self.grid[1]
        msg = "sampler=pixelcnn epoch %d/%d: train %.4f nats/grid (%.4f bits/code)"
        args: list[Any] = [record["epoch"], self.epochs, record["train"],
                           record["train"] / per_bit]
        if "val" in record:
            msg += ", val %.4f nats/grid (%.4f bits/code)"
            args += [record["val"], record["val"] / per_bit]
        log.info(msg, *args)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        net = self._need_prior()
        return self._embed(net.sample(n, self.temperature))

    @torch.no_grad()
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) of the learned prior for code maps z [..., latent_dim] (the codes of
        z; temperature 1): what `vae eval` puts in the bound in place of the uniform
        prior's -H W log K."""
        net = self._need_prior()
        net.eval()
        flat = z.reshape(-1, z.shape[-1])
        return -net.nll(self._codes(flat)).view(z.shape[:-1])
