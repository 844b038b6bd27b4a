"""The picture set of a run: written at the end of training and by `vae sample`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vae_cli.data.batching import to_unit
from vae_cli.evaluation.diagnostics import encode_all, posterior_stats
from vae_cli.objective.model import VAE
from vae_cli.objective.topdown import LayeredPrior
from vae_cli.reports.images import save_interpolations, save_reconstructions, save_traversals
from vae_cli.reports.layers import save_layer_resampling, save_temperatures
from vae_cli.reports.plots import plot_curves, plot_scatter
from vae_cli.reports.text_outputs import write_text_pictures
from vae_cli.runtime.run_folder import RunFileError, RunFolder, read_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def write_data_pictures(model: VAE, data, split: str, out_dir: Path, count: int = 64,
                        batch_size: int = 500, max_points: int = 5000) -> list[Path]:
    """Reconstructions, interpolations, traversals (rows ordered by KL) and a latent
    scatter coloured by label (or the first ground-truth factor); their text versions for
    a sequence model."""
    if data.vocab is not None:
        return write_text_pictures(model, data, split, out_dir)
    model.eval()
    out_dir = Path(out_dir)
    x_all = data.split(split)
    x = to_unit(x_all[:count])
    # a conditional model reads each example's own label wherever the example goes
    y_all = data.labels_for(split, model.conditional)
    y, y_stats = (None, None) if y_all is None else (y_all[:count], y_all[:max_points])
    written = [save_reconstructions(model, x, out_dir / "reconstructions.png", labels=y)]
    if len(x) >= 2:  # interpolations need a pair of examples
        written.append(save_interpolations(model, x, out_dir / "interpolations.png",
                                           labels=y))
    x_stats = x_all[:max_points]
    encoded = encode_all(model, x_stats, batch_size, y_stats)
    stats = posterior_stats(model, x_stats, batch_size, encoded=encoded)
    rank = stats["kl_per_dim"] or stats["activity"]  # a flow posterior has no per-dim KL
    order = sorted(model.prior.top_dims, key=lambda d: -rank[d])
    scale = torch.tensor(stats["aggregate_var"], device=x.device).sqrt().float()
    if order:  # a code map has no axes to sweep
        written.append(save_traversals(model, x, order, scale, out_dir / "traversals.png",
                                       labels=y))
    if isinstance(model.prior, LayeredPrior):  # model=vdvae: its layers' pictures
        written += [save_layer_resampling(model, x, out_dir / "layers.png"),
                    save_temperatures(model, out_dir / "temperatures.png")]
    mu = encoded[0]
    labels, factors = data.labels.get(split), data.factors.get(split)
    colour, name = None, ""
    if labels is not None:
        colour, name = labels[:max_points], "label"
    elif factors is not None:
        colour, name = factors[:max_points, 0], data.factor_names[0]
    written.append(plot_scatter(mu, colour, name, out_dir / "latent_scatter.png"))
    return written


def write_curves(run_dir: Path) -> Path | None:
    """curves.png from the run's metrics.csv; a file that cannot be read is skipped with a
    warning (the pictures are a view of the run, not the run)."""
    try:
        rows = read_metrics(RunFolder(Path(run_dir)).metrics)
    except RunFileError as e:
        log.warning("%s; no curves drawn", e)
        return None
    return plot_curves(rows, Path(run_dir) / "curves.png")
