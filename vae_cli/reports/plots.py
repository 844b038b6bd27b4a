"""Matplotlib figures: training curves from metrics.csv and a 2-D latent scatter."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


# train/val panels, when the run logged them and they move: the objective's terms, a VQ
# codebook's commitment, perplexity and usage, a Gumbel-softmax temperature (a constant
# such as VQ's KL, H W log K, says nothing a panel should show)
TERMS = ("loss", "recon", "div", "commit", "perplexity", "usage", "temperature")
# panels beside them, when the run logged them: the learning rate when a schedule moved
# it (log scale when positive) and the gradient norm before clipping
EXTRA = (("lr", "lr"), ("grad norm", "train_grad_norm"))


def plot_curves(rows: list[dict[str, str]], path: Path) -> Path | None:
    """Train/val loss, reconstruction, divergence and a family's own terms against epochs
    (metrics.csv's rows), then the learning rate and gradient norm where logged."""
    if not rows:
        return None
    plt = _pyplot()
    panels = curve_panels(rows)
    # a constant lr (no schedule) says nothing a panel should show
    extra = [(title, col) for title, col in EXTRA if filled(rows, col)
             and (col != "lr" or len(set(series(rows, col)[1])) > 1)]
    n = len(panels) + len(extra)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=False):
        for split, style in (("train", "-"), ("val", "--")):
            xs, ys = series(rows, f"{split}_{key}")
            if xs:
                ax.plot(xs, ys, style, label=split)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.legend()
    for ax, (title, col) in zip(axes[0][len(panels):], extra, strict=True):
        xs, values = series(rows, col)
        ax.plot(xs, values, "-")
        if min(values) > 0 and max(values) > min(values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def series(rows: list[dict], col: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a column where its cells are filled: a resume may have added or
    dropped it (metrics.csv's columns are every row's)."""
    rows = filled(rows, col)
    return [int(r["epoch"]) for r in rows], [float(r[col]) for r in rows]


def filled(rows: list[dict], col: str) -> list[dict]:
    return [r for r in rows if r.get(col) not in (None, "")]


def curve_panels(rows: list[dict]) -> list[str]:
    """The TERMS that get a train/val panel: loss and recon always, the others where they
    were logged and move."""
    return [k for k in TERMS if filled(rows, f"train_{k}")
            and (k in ("loss", "recon") or moves(rows, k))]


def moves(rows: list[dict], key: str) -> bool:
    """Whether train_/val_<key> change beyond the csv's 6 digits over the run."""
    values = [float(r[c]) for r in rows for c in (f"train_{key}", f"val_{key}") if r.get(c)]
    return bool(values) and max(values) - min(values) > 1e-5 * max(1.0, abs(max(values)))


def project_2d(mu: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The first two dimensions when there are two, else the top-2 principal components."""
    mu = mu.detach().cpu().double()
    if mu.shape[1] <= 2:
        return (mu if mu.shape[1] == 2 else torch.cat([mu, torch.zeros_like(mu)], 1)), "z"
    centred = mu - mu.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ v[:2].T  # fewer than two points give fewer than two components
    return torch.cat([xy, torch.zeros(len(xy), 2 - xy.shape[1], dtype=xy.dtype)], 1), "PC"


def plot_scatter(mu: torch.Tensor, colour: torch.Tensor | None, label: str,
                 path: Path) -> Path:
    plt = _pyplot()
    xy, axis = project_2d(mu)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    x, y = xy[:, 0].numpy(), xy[:, 1].numpy()
    kinds = None if colour is None else colour.detach().cpu().unique()
    if kinds is not None and not colour.is_floating_point() and len(kinds) <= 20:
        # class ids (or a factor's few values): one colour each, named in a legend
        tab = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
        for i, k in enumerate(kinds.tolist()):
            at = (colour.detach().cpu() == k).numpy()
            ax.scatter(x[at], y[at], s=4, alpha=0.7, color=tab(i), label=str(k))
        ax.legend(title=label, markerscale=3, fontsize="small", loc="best")
    elif colour is not None:
        sc = ax.scatter(x, y, c=colour.detach().cpu().double().numpy(), s=4, alpha=0.7,
                        cmap="viridis")
        fig.colorbar(sc, ax=ax, label=label)
    else:
        ax.scatter(x, y, s=4, alpha=0.7)
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.set_title("posterior means")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
