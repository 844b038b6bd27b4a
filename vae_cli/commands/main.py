"""`vae` dispatcher: one Hydra app per subcommand (train | eval | sample)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_cli.errors import UserError

log = logging.getLogger("vae_cli")

USAGE = """usage: vae <command> [hydra overrides...]

commands:
  train    train a model             vae train model=conv divergence=kl trainer.epochs=5
  eval     score a checkpoint        vae eval ckpt=outputs/<run>/checkpoints/best.pt
  sample   samples and pictures      vae sample ckpt=<run>/checkpoints/best.pt num_samples=64
  compare  one table over runs       vae compare multirun/<date>/<time> --sort test_nll

  vae <command> --help     the command's config groups and options
  vae train --cfg job      print the composed config without running
  vae train -m model=mlp,conv seed=0,1     a Hydra multirun sweep
"""


def config_dir() -> Path:
    """configs/ beside the package (source checkout, editable install) or inside it (wheel)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise UserError(f"cannot find the config tree next to {here}; reinstall the package")


def _run_dir(ckpt: str | None, default: str) -> str:
    """Resuming from ckpt=<run>/checkpoints/x.pt writes back into <run>."""
    if not ckpt:
        return default
    from vae_cli.runtime.checkpoint import run_dir_of
    return str(run_dir_of(ckpt))


def _output_subdir(run_dir: str) -> str:
    """A folder that already holds a run keeps its .hydra/ untouched: a resume (or a refused
    second start) records its own config beside it."""
    if (Path(run_dir) / ".hydra" / "config.yaml").exists():
        return f".hydra/again-{datetime.now():%Y%m%d-%H%M%S-%f}"
    return ".hydra"


def _register_resolvers() -> None:
    for name, fn in (("vae_run_dir", _run_dir), ("vae_output_subdir", _output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


class HeldStderr:
    """Holds what Hydra writes to stderr until the task starts. If Hydra stops before (a bad
    override, an unknown option), its several-line report is condensed into one line."""

    def __init__(self, stream):
        self.stream, self.held, self.released = stream, [], False

    def write(self, text: str) -> int:
        if self.released:
            return self.stream.write(text)
        self.held.append(text)
        return len(text)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.stream.write("".join(self.held))

    def condensed(self) -> str:
        text = "".join(self.held)
        if "Traceback (most recent call last)" in text:  # e.g. the run folder can't be made
            lines = [ln.strip() for ln in text.split("Set the environment variable")[0]
                     .splitlines() if ln.strip()]
            last = lines[-1] if lines else "unknown failure"
            if "[Errno" in last:
                return f"cannot write the run folder ({last}); set hydra.run.dir elsewhere"
            return last
        parts: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith(("Config search path", "Set the environment variable")):
                break
            if ": error: " in line:  # argparse: its last line says it all
                return line
            if line and not line.startswith(("full_key:", "object_type=")):
                parts.append(line)
        joined = "; ".join(parts).replace(":;", ":").replace(".;", ";")
        return joined or "invalid command line (see vae --help)"

    def __getattr__(self, name):  # isatty, fileno, flush, encoding... for tqdm and logging
        return getattr(self.stream, name)


def _guard(fn, cfg: DictConfig):
    """UserError -> one line on stderr and exit 2 (in a sweep: log it, keep the others).
    Anything unexpected -> one line naming it, exit 1; HYDRA_FULL_ERROR=1 shows the trace."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if isinstance(sys.stderr, HeldStderr):
        sys.stderr.release()
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return fn(cfg)
    except UserError as e:
        if sweep:
            log.error("job failed: %s", e)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if sweep:
            log.error("job failed: %s: %s", type(e).__name__, first)
            return None
        print(f"error: unexpected {type(e).__name__}: {first} "
              "(HYDRA_FULL_ERROR=1 prints the traceback)", file=sys.stderr)
        sys.exit(1)


def _share_cores(hc) -> None:
    """Jobs that a launcher runs side by side on this machine (joblib's n_jobs) split its
    cores, rather than each starting a thread per core and thrashing."""
    jobs = OmegaConf.select(hc, "launcher.n_jobs", default=None)
    if not isinstance(jobs, int) or jobs == 1:
        return
    import torch

    cores = os.cpu_count() or 1
    jobs = jobs if jobs > 0 else max(1, cores + 1 + jobs)  # joblib: -1 all cores, -2 all but one
    batch = OmegaConf.select(hc, "sweeper.n_jobs", default=None)  # Optuna: trials at once
    if isinstance(batch, int) and batch > 0:
        jobs = min(jobs, batch)
    torch.set_num_threads(max(1, cores // min(jobs, cores)))


def _train(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from vae_cli.config.components import validate
    from vae_cli.runtime import checkpoint
    from vae_cli.training.recipe import find_resume, resume_config, train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    _share_cores(hc)
    cfg = validate(cfg)
    path = find_resume(cfg, run_dir)
    ckpt = None
    if path is not None:
        ckpt = checkpoint.load(path)
        if "optim" not in ckpt or "state" not in ckpt:
            raise UserError(f"{path} holds no optimizer state to resume from")
        cfg = resume_config(ckpt["config"], cfg, list(hc.overrides.task))
    summary = train(cfg, run_dir, ckpt)
    log.info("best val loss %.4f after %d epochs; outputs in %s", summary["best_val"],
             summary["epoch"], run_dir)
    return summary["best_val"]


def _eval(cfg: DictConfig):
    from vae_cli.evaluation.evaluate import run
    return run(cfg)


def _sample(cfg: DictConfig):
    from vae_cli.commands.sample import run
    return run(cfg)


COMMANDS = {"train": _train, "eval": _eval, "sample": _sample}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[0]
    if command == "compare":  # reads finished runs: plain arguments, no Hydra app
        from vae_cli.commands.compare import main as compare

        try:
            return compare(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}, compare"
              " (see vae --help)", file=sys.stderr)
        return 2
    try:
        cfg_dir = config_dir()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import hydra

    _register_resolvers()
    task = COMMANDS[command]

    def app(cfg: DictConfig):
        return _guard(task, cfg)

    args = argv[1:]
    if command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from vae_cli.runtime import distributed  # torchrun: join the group, share one run folder

        try:
            distributed.init()
            args = distributed.run_dir_args(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    sys.argv = [f"vae {command}", *args]
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    held = sys.stderr = HeldStderr(sys.stderr) if not full else sys.stderr
    finished = False
    try:
        hydra.main(version_base="1.3", config_path=str(cfg_dir), config_name=command)(app)()
        finished = True
    except SystemExit as e:
        if isinstance(held, HeldStderr) and not held.released and e.code not in (0, None):
            print(f"error: {held.condensed()}", file=held.stream)
            held.held.clear()
            return 2
        raise
    finally:
        if isinstance(held, HeldStderr):
            held.release()
            sys.stderr = held.stream
        if "torch.distributed" in sys.modules:
            from vae_cli.runtime import distributed
            distributed.shutdown(finished)
    return 0
