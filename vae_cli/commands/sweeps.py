"""Sweeps that report failure honestly: a failed job leaves a marker in its folder, and
after the sweep the dispatcher exits non-zero naming the failed jobs' logs.

``SweepReport`` is a Hydra callback (configs/train.yaml, hydra.callbacks): Hydra calls
``on_multirun_end`` in the launching process once every job ran, whichever launcher ran
them (in this process, joblib's workers, a cluster). The jobs tell it how they ended
through the sweep's ledger, ``<sweep dir>/.vae-jobs/<job number>.json``, one file per job
of this sweep: so a sweep into a folder of an earlier sweep counts its own jobs only, and
a job refused before any work can say so without writing into the folder it was refused.

A job whose folder holds a run (an earlier sweep's) and that fails without changing it is
*refused*: the folder is left as it was (no FAILED, its log as it was), the ledger says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae_cli.runtime.files import write_text
from vae_cli.runtime.run_folder import LOG, RunFolder, take_back
from vae_cli.training.resume import OWN, another_run

log = logging.getLogger("vae_cli")

LEDGER = ".vae-jobs"


def mark_failed(job_dir: Path, message: str) -> None:
    write_text(RunFolder(job_dir).failed, message + "\n")


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run in ``folder`` (all but a start's own records): size, mtime."""
    found = {}
    for p in folder.rglob("*") if folder.is_dir() else []:
        name = str(p.relative_to(folder))
        with suppress(OSError):  # a file that went meanwhile
            if name.split(os.sep)[0] not in OWN and p.is_file():
                found[name] = (p.stat().st_size, p.stat().st_mtime_ns)
    return found


@dataclass
class JobStart:
    """A sweep job's folder as its task found it, to leave it so when the job is refused."""

    folder: Path
    run: dict[str, tuple[int, int]]  # the run already there ({}: none)
    log_size: int  # its train.log's size before this job (0: none of its own)

    @classmethod
    def of(cls, folder: Path) -> JobStart:
        if not another_run(folder):
            return cls(folder, {}, 0)
        log_file = folder / LOG  # Hydra opened (made) it before the task: empty is its own
        return cls(folder, _files(folder), log_file.stat().st_size if log_file.is_file() else 0)

    def refused(self) -> bool:
        """Failed without changing the run already in the folder."""
        return bool(self.run) and _files(self.folder) == self.run

    def take_back(self) -> None:
        """Leave the folder as the job found it: no record of this start, the log as it was
        (and no more lines in it: the log handler writing there is closed)."""
        log_file = self.folder / LOG
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if getattr(handler, "baseFilename", None) == os.path.abspath(log_file):
                root.removeHandler(handler)
                handler.close()
        take_back(self.folder, self.log_size)


def _ledger_entry(outcome: str, message: str = "") -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    entry = {"folder": hc.runtime.output_dir, "log": f"{hc.job.name}.log",
             "outcome": outcome, "message": message}
    write_text(Path(hc.sweep.dir) / LEDGER / f"{hc.job.num}.json", json.dumps(entry) + "\n")


def job_failed(start: JobStart, message: str) -> None:
    """A sweep goes on past a failed job: its folder records why, unless the job was
    refused, then the folder is left as it was and only the ledger says so."""
    if start.refused():
        start.take_back()
        log.error("job refused, %s left as it was: %s", start.folder, message)
        _ledger_entry("refused", message)
        return
    log.error("job failed: %s", message)
    mark_failed(start.folder, message)
    _ledger_entry("failed", message)


def job_done(folder: Path, name: str, sweep: bool) -> None:
    """A training that ended well is no longer failed: a FAILED of an earlier start in its
    folder (a failed job whose folder this one reused or resumed) goes."""
    if name == "train":
        RunFolder(folder).failed.unlink(missing_ok=True)
    if sweep:
        _ledger_entry("done")


@dataclass
class Outcome:
    swept: bool = False  # a sweep started in this command
    sweep: Path | None = None
    n_trials: int | None = None  # a search's number of trials (hydra.sweeper.n_trials)
    empty: list[str] = field(default_factory=list)  # overrides that sweep no value
    jobs: int = 0
    failed: list[Path] = field(default_factory=list)  # the failed jobs' logs
    refused: list[Path] = field(default_factory=list)  # folders left as they were

    def reset(self) -> None:
        self.__init__()

    def start(self, config: DictConfig) -> None:
        self.reset()
        self.swept = True
        self.sweep = Path(config.hydra.sweep.dir)
        n = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
        self.n_trials = n if isinstance(n, int) else None
        self.empty = _empty_sweeps(list(config.hydra.overrides.task))
        shutil.rmtree(self.sweep / LEDGER, ignore_errors=True)  # an earlier sweep's

    def read(self) -> None:
        """This sweep's jobs, from its ledger."""
        entries = []
        for p in sorted((self.sweep / LEDGER).glob("*.json")) if self.sweep else []:
            with suppress(OSError, ValueError):
                entries.append(json.loads(p.read_text()))
        self.jobs = len(entries)
        self.failed = sorted((Path(e["folder"]) / e["log"] for e in entries
                              if e["outcome"] == "failed"), key=str)
        self.refused = sorted((Path(e["folder"]) for e in entries
                               if e["outcome"] == "refused"), key=str)

    def summary(self) -> str:
        """The failed and refused jobs, one line."""
        parts = [f"{len(self.failed) + len(self.refused)} of {self.jobs} sweep jobs failed"]
        if self.failed:
            parts.append(f"their logs: {', '.join(map(str, self.failed))}")
        if self.refused:
            parts.append(f"refused as their folders hold another run, left as they were: "
                         f"{', '.join(map(str, self.refused))} (choose another "
                         "hydra.sweep.dir)")
        return "; ".join(parts)

    def no_jobs(self) -> str:
        if self.n_trials is not None and self.n_trials < 1:
            return (f"hydra.sweeper.n_trials={self.n_trials} runs no trial; set it to 1 "
                    "or more")
        if self.empty:
            return f"the sweep has no jobs: {', '.join(self.empty)} sweeps no value"
        return "the sweep has no jobs"


def _empty_sweeps(overrides: list[str]) -> list[str]:
    """The overrides whose list or range holds no value (range(5,1)): a sweep of no job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - the sweeper reports a bad override itself
        return []
    empty = []
    for o in parsed:
        with suppress(Exception):  # intervals, globs: not enumerable here
            if o.is_sweep_override() and not list(o.sweep_string_iterator()):
                empty.append(o.input_line)
    return empty


REPORT = Outcome()


class SweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        REPORT.start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        REPORT.read()
