"""`vae` dispatcher: one Hydra app per subcommand, and the one place where errors become
one line and an exit code.

Hydra is run with HYDRA_FULL_ERROR=1 so that its own failures (a bad override, an unknown
option, a run folder it cannot make) reach this module as exceptions, which are caught by
type below; the user's own HYDRA_FULL_ERROR=1 still shows every traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vae_cli import errors
from vae_cli.config.registry import check_retired, config_dir
from vae_cli.errors import UserError
from vae_cli.runtime.run_folder import RunFolder, in_run_folder
from vae_cli.training.signals import Signalled, raise_on_signals

USAGE = """usage: vae <command> [hydra overrides...]

commands:
  train    train a model             vae train model=conv divergence=kl trainer.epochs=5
  eval     score a checkpoint        vae eval ckpt=outputs/<run>/checkpoints/best.pt
  sample   samples and pictures      vae sample ckpt=<run>/checkpoints/best.pt num_samples=64
  export   safetensors or ONNX       vae export ckpt=<run>/checkpoints/best.pt format=onnx
  compare  one table over runs       vae compare multirun/<date>/<time> --sort test_nll
  shard    images as WebDataset      vae shard photos/ shards/ --per-shard 1000

  vae <command> --help     the command's config groups and options
  vae train --cfg job      print the composed config without running
  vae train -m model=mlp,conv seed=0,1     a Hydra multirun sweep
"""


def _command(name: str) -> Callable[[DictConfig], object]:
    """The task of a Hydra app, imported only when Hydra runs it: `--cfg job` and `--help`
    print without importing torch."""
    import importlib

    def task(cfg: DictConfig) -> object:
        return importlib.import_module(f"vae_cli.commands.{name}").run(cfg)

    return task


def _run_dir(ckpt: str | None, default: str) -> str:
    """Resuming from ckpt=<run>/checkpoints/x.pt writes back into <run>; a checkpoint kept
    anywhere else starts a new run folder rather than filling the one it sits in."""
    if not ckpt or not in_run_folder(ckpt):
        return default
    return str(RunFolder.of_checkpoint(ckpt).path)


def _output_subdir(run_dir: str) -> str:
    """A folder that already holds a run keeps its .hydra/ untouched: a resume (or a refused
    second start) records its own config beside it. The folder is the job's own (a sweep's
    job runs in <sweep dir>/<n>, not in hydra.run.dir); one holding only an earlier start's
    records (a failed sweep job's) takes this start's in their place."""
    from vae_cli.training.resume import another_run

    folder = Path(_job_dir() or run_dir)
    if another_run(folder):
        return f".hydra/again-{datetime.now():%Y%m%d-%H%M%S-%f}"
    return ".hydra"


def _job_dir() -> str | None:
    """The folder Hydra set for the job being started, if it set one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)


def register_resolvers() -> None:
    for name, fn in (("vae_run_dir", _run_dir), ("vae_output_subdir", _output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def one_line(e: BaseException) -> str:
    """The whole message, causes included (see errors.one_line)."""
    return errors.one_line(e, chain=True) or "invalid command line (see vae --help)"


def guarded(task: Callable[[DictConfig], object], full_error: bool):
    """The Hydra task. Bad input (UserError, an OmegaConf refusal) -> one line and exit 2;
    in a sweep the job is marked failed and the others run. A signal -> one line and exit
    128 + n, ending a sweep too. Out of memory -> one line with the size and what needs
    less, exit 1. Anything unexpected -> one line naming it and exit 1, or the traceback
    when the user set HYDRA_FULL_ERROR=1."""

    def app(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from vae_cli.commands import sweeps

        hc = HydraConfig.get() if HydraConfig.initialized() else None
        sweep = hc is not None and hc.mode == RunMode.MULTIRUN
        start = sweeps.JobStart.of(Path(hc.runtime.output_dir)) if sweep else None
        try:
            result = unwrapped(task, cfg)
        except Signalled as e:
            fail(f"{e} received; stopped", 128 + e.signum)
        except (UserError, OmegaConfBaseException) as e:
            code = e.exit_code if isinstance(e, UserError) else 2
            if start and code == 2:
                return sweeps.job_failed(start, one_line(e))
            fail(one_line(e), code)
        except Exception as e:
            if full_error:
                raise
            message = errors.out_of_memory(e) or (
                f"unexpected {type(e).__name__}: {errors.one_line(e)} "
                "(HYDRA_FULL_ERROR=1 prints the traceback)")
            if start:
                return sweeps.job_failed(start, message)
            fail(message, 1)
        if hc is not None:
            sweeps.job_done(Path(hc.runtime.output_dir), hc.job.name, sweep)
        return result

    return app


def unwrapped(task: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """``task(cfg)``, raising as itself a signal or a UserError that a library wrapped in an
    exception of its own (torch.onnx.export reports a SIGTERM as a TorchExportError)."""
    try:
        return task(cfg)
    except Exception as e:
        inner = errors.buried(e, (Signalled, UserError))
        if inner is None:
            raise
        raise inner from None


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_flags(args: list[str]) -> None:
    """Hydra's own command-line flags, parsed before Hydra does so that a wrong one raises
    rather than printing usage and exiting."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    _, unknown = parser.parse_known_args(args)
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see vae --help)")


def run_hydra(command: str, args: list[str], full_error: bool) -> None:
    import hydra

    register_resolvers()
    check_flags(args)
    check_retired(args)
    sys.argv = [f"vae {command}", *args]
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exiting
    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()),
                   config_name=command)(guarded(_command(command), full_error))()
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def main(argv: list[str] | None = None) -> int:
    """`vae <command> [overrides]`: the exit code. A caller in the same process (a
    notebook, a test) gets its process back as it was (``as_found``)."""
    entry = argv is None  # the process's own command, not a caller's in-process one
    argv = list(sys.argv[1:] if argv is None else argv)
    with as_found():
        code = run_command(argv)
    if entry and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave(code)
    return code


def leave(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown, its files flushed: gloo's
    threads can abort that teardown in C++ ("terminate called without an active
    exception", exit -6) after a run that finished and left its group."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def as_found() -> Iterator[None]:
    """Put back what a command changes in its process for its own run: argv (Hydra reads
    it), the SIGTERM/SIGINT handlers, the root logger's handlers and level (Hydra's, one of
    which writes into the run's train.log), a sweep's outcome. Otherwise a second command
    in the process would log into the first one's train.log, or exit 1 for its failed
    jobs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    argv = sys.argv
    try:
        yield
    finally:
        sys.argv = argv
        if threading.current_thread() is threading.main_thread():
            for sig, handler in signals.items():
                signal.signal(sig, handler)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        sweeps = sys.modules.get("vae_cli.commands.sweeps")
        if sweeps is not None:
            sweeps.REPORT.reset()


def run_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    finished = False
    raise_on_signals()
    try:
        if command in ("compare", "shard"):  # plain arguments, no Hydra app
            import importlib

            return importlib.import_module(f"vae_cli.commands.{command}").main(args)
        if command not in ("train", "eval", "sample", "export"):
            raise UserError(f"unknown command {command!r}; expected one of train, eval, "
                            "sample, export, compare, shard (see vae --help)")
        if command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from vae_cli.runtime import distributed  # torchrun: one group, one run folder

            distributed.init()
            args = distributed.run_dir_args(args)
        run_hydra(command, args, full_error)
        finished = True
        return sweep_outcome()
    except Signalled as e:
        print(f"error: {e} received; stopped", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        ended = None if full_error else sweep_ended()
        if ended is not None:
            print(f"error: {ended[0]}", file=sys.stderr)
            return ended[1]
        message = describe(e, command)
        if full_error or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return e.exit_code if isinstance(e, UserError) else 2
    finally:
        if "torch.distributed" in sys.modules:
            from vae_cli.runtime import distributed
            distributed.shutdown(finished)


def sweep_outcome() -> int:
    """0; or 1 with one line when jobs of the sweep that just ran failed or were refused;
    or 2 when it had no job (an empty range, no trial)."""
    from vae_cli.commands.sweeps import REPORT

    if REPORT.swept and REPORT.jobs == 0:
        print(f"error: {REPORT.no_jobs()}", file=sys.stderr)
        return 2
    if not REPORT.failed and not REPORT.refused:
        return 0
    print(f"error: {REPORT.summary()}", file=sys.stderr)
    return 1


def sweep_ended() -> tuple[str, int] | None:
    """The one line and exit code for a sweep that its sweeper ended with an error of its
    own as no job completed (Optuna's "No trials are completed yet"): no trial asked for, or
    every job failed, the cause to report. None otherwise (no sweep, a job completed, an
    error before any job ran)."""
    sweeps = sys.modules.get("vae_cli.commands.sweeps")
    if sweeps is None or not sweeps.REPORT.swept:
        return None
    report = sweeps.REPORT
    report.read()
    if report.jobs == 0 and report.n_trials is not None and report.n_trials < 1:
        return report.no_jobs(), 2
    if report.jobs and len(report.failed) + len(report.refused) == report.jobs:
        return f"no job of the sweep completed: {report.summary()}", 1
    return None


def describe(e: Exception, command: str = "train") -> str | None:
    """The one line for an error the user can fix (bad input, a Hydra or OmegaConf
    refusal, a run folder that cannot be made); None for anything else."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    if isinstance(e, OverrideParseException):  # Hydra reads unquoted values in ASCII only
        key, _, value = e.override.partition("=")
        if key.isascii() and not value.isascii():
            return (f"{e.override}: a value with characters outside ASCII must be quoted, "
                    f"as in '{key}=\"{value}\"'")
    if isinstance(e, MissingConfigException) and e.options:  # an unknown group option
        return (f"no config {e.missing_cfg_file!r}; the options are "
                f"{', '.join(sorted(e.options))}")
    if isinstance(e, UserError | HydraException | OmegaConfBaseException |
                  argparse.ArgumentError):
        return one_line(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({one_line(e)}); free space and start again"
    if isinstance(e, OSError) and command in ("compare", "shard"):
        return f"cannot write {e.filename or 'the output'} ({one_line(e)})"
    if isinstance(e, OSError):  # Hydra making the run (or sweep) folder, before the task
        sweeps = sys.modules.get("vae_cli.commands.sweeps")
        swept = sweeps is not None and sweeps.REPORT.swept
        key, what = ("hydra.sweep.dir", "sweep") if swept else ("hydra.run.dir", "run")
        return f"cannot write the {what} folder ({one_line(e)}); set {key} elsewhere"
    return None
