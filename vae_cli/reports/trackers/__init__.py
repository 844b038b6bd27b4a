"""Experiment trackers, the ``logger=`` group: where a run's resolved config, metrics,
picture grids and final checkpoint go besides its own folder.

``logger=csv`` is the base class and adds nothing: metrics.csv is written by the trainer
whatever the tracker. Each other tracker imports its package when it is built (before any
work, so a missing package is one line naming the extra) and never otherwise, so a run
without it does not pay for the import. Only rank 0 builds one (training/recipe.py).

A tracker's own run id is kept in the run folder (trackers.json), not in the checkpoint:
the run folder is what a resume continues, a checkpoint copied elsewhere starts a new run
folder and so a new tracker run, and checkpoints stay byte-identical with or without one.
"""

from vae_cli.reports.trackers.base import Status, Tracker
from vae_cli.reports.trackers.mlflow import MLflow
from vae_cli.reports.trackers.tensorboard import TensorBoard
from vae_cli.reports.trackers.wandb import WandB

__all__ = ["MLflow", "Status", "TensorBoard", "Tracker", "WandB"]
