"""What a training run shows while it runs and when it ends: per-epoch reconstructions
and samples (lines of text for a sequence model), TensorBoard, and the final picture set."""

from __future__ import annotations

from pathlib import Path

import torch

from vae_cli.data.base import Splits
from vae_cli.data.batching import as_input
from vae_cli.errors import UserError
from vae_cli.objective.model import VAE
from vae_cli.reports.images import (
    reconstruction_rows,
    sample_draws,
    save_reconstructions,
    save_samples,
)
from vae_cli.reports.pictures import write_curves, write_data_pictures
from vae_cli.reports.text import epoch_text


class TrainingReports:
    """Rank 0's view of a run: ``epoch(...)`` after each epoch, ``final()`` when training
    ended, ``close()`` in any case."""

    def __init__(self, model: VAE, data: Splits, run_dir: Path, num_images: int, seed: int,
                 tensorboard: bool):
        self.model, self.data, self.run_dir, self.seed = model, data, run_dir, seed
        self.show, self.num_images = as_input(data.val[:num_images]), num_images
        # the shown examples' own labels, for a conditional model
        self.labels = data.labels_for("val")[:num_images] if model.conditional else None
        self.board = open_tensorboard(run_dir) if tensorboard else None

    def epoch(self, epoch: int, step: int, row: dict, pictures: bool) -> None:
        if pictures:
            self.pictures(epoch, step)
        if self.board:
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    self.board.add_scalar(k.replace("_", "/", 1), v, step)
            self.board.flush()

    def pictures(self, epoch: int, step: int) -> None:
        """Reconstructions of fixed val examples and decodes of prior draws (for a
        conditional model one row per class, each column one draw)."""
        model, x, folder = self.model, self.show, self.run_dir / "images"
        model.eval()
        # The same noise every epoch, pushed through the current (possibly learned) prior;
        # the forked RNG leaves training's random stream untouched.
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            with torch.no_grad():
                z = model.prior.sample(sample_draws(model, self.num_images))
        if self.data.vocab is not None:
            epoch_text(model, self.data.vocab, x, z, folder / f"text_{epoch:03d}.txt",
                       self.board, step)
            return
        save_reconstructions(model, x, folder / f"reconstructions_{epoch:03d}.png",
                             labels=self.labels)
        samples, _ = save_samples(model, z, folder / f"samples_{epoch:03d}.png")
        if self.board:
            from torchvision.utils import make_grid

            rows = reconstruction_rows(model, x, labels=self.labels).cpu()
            self.board.add_image("reconstructions", make_grid(rows), step)
            per_row = len(z) if model.conditional else 8  # a conditional grid: class rows
            self.board.add_image("samples", make_grid(samples.float().cpu(), per_row), step)

    def final(self) -> None:
        """The picture set of the finished run, and the training curves."""
        write_data_pictures(self.model, self.data, "val", self.run_dir)
        write_curves(self.run_dir)

    def close(self) -> None:
        if self.board:
            self.board.close()


def open_tensorboard(run_dir: Path):
    """A SummaryWriter under <run>/tensorboard, only when the optional package is there."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("trainer.tensorboard=true needs the tensorboard package: "
                        "pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))
