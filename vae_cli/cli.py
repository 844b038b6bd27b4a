"""`vae` dispatcher: one Hydra app per subcommand (train | eval | sample)."""

from __future__ import annotations

import logging
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
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise UserError(f"cannot find the config tree next to {here}; reinstall the package")


def _run_dir(ckpt: str | None, default: str) -> str:
    """Resuming from ckpt=<run>/checkpoints/x.pt writes back into <run>."""
    if not ckpt:
        return default
    from vae_cli.checkpoint import run_dir_of
    return str(run_dir_of(ckpt))


def _output_subdir(ckpt: str | None) -> str:
    """A resumed run keeps the original .hydra/ and records its own config beside it."""
    return f".hydra/resume-{datetime.now():%Y%m%d-%H%M%S}" if ckpt else ".hydra"


def _register_resolvers() -> None:
    for name, fn in (("vae_run_dir", _run_dir), ("vae_output_subdir", _output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _guard(fn, cfg: DictConfig):
    """UserError -> one line on stderr and exit 2 (in a sweep: log it, keep the others)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return fn(cfg)
    except UserError as e:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("job failed: %s", e)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _train(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from vae_cli import checkpoint
    from vae_cli.config import validate
    from vae_cli.train import find_resume, resume_config, train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
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
    from vae_cli.evaluate import run
    return run(cfg)


def _sample(cfg: DictConfig):
    from vae_cli.sample import run
    return run(cfg)


COMMANDS = {"train": _train, "eval": _eval, "sample": _sample}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = argv[0]
    if command == "compare":  # reads finished runs: plain arguments, no Hydra app
        from vae_cli.compare import main as compare

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

    sys.argv = [f"vae {command}", *argv[1:]]
    hydra.main(version_base="1.3", config_path=str(cfg_dir), config_name=command)(app)()
    return 0
