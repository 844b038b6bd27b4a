"""Sweeps that report failure honestly: a failed job leaves a marker in its folder, and
after the sweep the dispatcher exits non-zero naming the failed jobs' logs.

``SweepReport`` is a Hydra callback (configs/train.yaml, hydra.callbacks): Hydra calls
``on_multirun_end`` in the launching process once every job ran, whichever launcher ran
them (in this process, joblib's workers, a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vae_cli.runtime.files import write_text
from vae_cli.runtime.run_folder import HYDRA, RunFolder


def mark_failed(job_dir: Path, message: str) -> None:
    write_text(RunFolder(job_dir).failed, message + "\n")


@dataclass
class Outcome:
    jobs: int = 0
    failed: list[Path] = field(default_factory=list)  # the failed jobs' logs


REPORT = Outcome()


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = [p for p in sweep.iterdir() if (p / HYDRA).is_dir()] if sweep.is_dir() else []
        REPORT.jobs = len(jobs)
        REPORT.failed = sorted((p / f"{config.hydra.job.name}.log" for p in jobs
                                if RunFolder(p).failed.is_file()), key=str)
