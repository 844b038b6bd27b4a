"""What a training run shows while it runs and when it ends: per-epoch reconstructions
and samples (lines of text for a sequence model), the final picture set, and all of it
sent to the run's experiment tracker (logger=, see trackers/)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from vae_cli.data.base import Splits
from vae_cli.data.batching import as_input
from vae_cli.errors import UserError, one_line
from vae_cli.objective.model import VAE
from vae_cli.reports.images import sample_draws, save_reconstructions, save_samples
from vae_cli.reports.pictures import write_curves, write_data_pictures
from vae_cli.reports.text_outputs import epoch_text
from vae_cli.reports.trackers import Status, Tracker

log = logging.getLogger(__name__)


def metric_name(column: str) -> str:
    """A metrics.csv column as a tracker's metric: train_loss -> train/loss (trackers group
    metrics by the part before the slash), lr -> lr."""
    return column.replace("_", "/", 1)


class TrainingReports:
    """Rank 0's view of a run: ``start(...)`` before the first step, ``step(...)`` where
    the loop reports progress, ``epoch(...)`` after each epoch, ``final()`` and
    ``finish(...)`` when training ended, ``close(...)`` in any case."""

    def __init__(self, model: VAE, data: Splits, run_dir: Path, num_images: int, seed: int,
                 tracker: Tracker | None = None):
        self.model, self.data, self.run_dir, self.seed = model, data, run_dir, seed
        self.show, self.num_images = as_input(data.val[:num_images]), num_images
        # the shown examples' own labels, for a conditional model
        labels = data.labels_for("val", model.conditional)
        self.labels = None if labels is None else labels[:num_images]
        self.tracker = tracker or Tracker()

    def start(self, config: dict, resumed_at: int | None, rows: list[dict]) -> None:
        """Failing here stops the run before any training (a bad tracking URI...). A
        tracker run started by a resumed run (logger= added on the resume) gets the
        earlier epochs' metrics.csv rows first."""
        try:
            continued = self.tracker.start(config, self.run_dir, resumed_at)
        except UserError:
            raise
        except Exception as e:  # a corrupt store, a server's own error: before any step
            raise UserError(f"logger={self.tracker.option} could not start "
                            f"({type(e).__name__}: {one_line(e)})") from None
        if not continued:
            for row in rows:
                self.track("log_metrics", self.numbers(row), int(row["step"]))

    @staticmethod
    def numbers(row: dict) -> dict[str, float]:
        """A metrics.csv row as tracker metrics (rows of checkpoints that predate rows in
        the state come from the file, as text)."""
        numbers = {}
        for key, value in row.items():
            try:
                numbers[metric_name(key)] = float(value)
            except (TypeError, ValueError):
                continue
        numbers.pop("step", None)
        return numbers

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """The loop's running numbers (the on_log hook of training/step.py)."""
        self.track("log_metrics", {f"train/{k}_step": v for k, v in metrics.items()}, step)

    def epoch(self, epoch: int, step: int, row: dict, pictures: bool) -> None:
        self.track("log_metrics", self.numbers(row), step)
        if pictures:
            self.pictures(epoch, step)

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
            path = epoch_text(model, self.data.vocab, x, z, folder / f"text_{epoch:03d}.txt")
            self.track("log_text", "samples", path, step)
            return
        path = save_reconstructions(model, x, folder / f"reconstructions_{epoch:03d}.png",
                                    labels=self.labels)
        self.track("log_image", "reconstructions", path, step)
        path = folder / f"samples_{epoch:03d}.png"
        save_samples(model, z, path)
        self.track("log_image", "samples", path, step)

    def final(self, step: int) -> None:
        """The picture set of the finished run, and the training curves (final/<name> in
        a tracker, apart from the per-epoch series)."""
        written = write_data_pictures(self.model, self.data, "val", self.run_dir)
        written.append(write_curves(self.run_dir))
        for path in filter(None, written):
            kind = "log_image" if path.suffix == ".png" else "log_text"
            self.track(kind, f"final/{path.stem}", path, step)

    def finish(self, checkpoint: Path) -> None:
        """Training finished (not interrupted): its checkpoint goes to the tracker."""
        self.track("log_artifact", checkpoint)

    def close(self, status: Status) -> None:
        self.track("close", status)

    def track(self, method: str, *args) -> None:
        """One tracker call. A tracker failing mid-run (a server gone) warns once and is
        dropped: the run folder is the record, and hours of training are not lost to it."""
        try:
            getattr(self.tracker, method)(*args)
        except Exception as e:
            failed, self.tracker = self.tracker, Tracker()
            reason = one_line(e)
            log.warning("logger=%s failed (%s); training goes on without it",
                        failed.option, reason)
            if method != "close":
                with contextlib.suppress(Exception):  # already reported
                    failed.close("failed")
