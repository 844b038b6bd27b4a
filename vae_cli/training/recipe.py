"""The training recipe: setup, loop, validate, checkpoint, pictures. Read top to bottom."""

from __future__ import annotations

import csv
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid
from tqdm import tqdm

from vae_cli.config.build import autocast, build_model, build_optimizer, resolve_device
from vae_cli.config.components import COMPONENTS, instantiate, validate
from vae_cli.data.batching import as_input, shuffled
from vae_cli.errors import UserError
from vae_cli.evaluation.evaluate import evaluate
from vae_cli.reports.images import reconstruction_rows, save_reconstructions, save_samples
from vae_cli.reports.pictures import write_curves, write_data_pictures
from vae_cli.reports.text import epoch_text
from vae_cli.runtime import checkpoint, distributed

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """metrics.csv, one row per epoch; appends on resume with the same columns."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] | None = None
        if path.exists():
            with path.open() as f:
                self.columns = next(csv.reader(f), None)

    def append(self, row: dict) -> None:
        new = self.columns is None
        if new:
            self.columns = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def find_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ckpt=..., or last.pt when trainer.resume=true (or
    auto and it exists)."""
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.get("ckpt"):
        return Path(cfg.ckpt)
    if cfg.trainer.resume == "auto":  # a requeued cluster job: continue if it had started
        return last if last.exists() else None
    if cfg.trainer.resume:
        if not last.exists():
            raise UserError(f"trainer.resume=true but {last} does not exist; "
                            "set hydra.run.dir=<run folder> or ckpt=<path>")
        return last
    if last.exists():
        raise UserError(f"{run_dir} already holds checkpoints; pass trainer.resume=true to "
                        "continue it or choose another hydra.run.dir")
    return None


def resume_config(saved: dict, current: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's config, with this command's trainer/optim/seed overrides on top.

    Component choices (dataset, model, ...) define the weights, so changing one is refused.
    """
    cfg = OmegaConf.create(saved)
    for ov in overrides:
        key = ov.lstrip("+~").split("=", 1)[0]
        head = key.split(".")[0].split("@")[0]
        if head in ("ckpt", "hydra") or key == "trainer.resume":
            continue
        if head in COMPONENTS:
            if key == head:  # a group choice: compare the resulting nodes
                here, there = ov.split("=", 1)[1], "another option"
                same = OmegaConf.to_container(current[head], resolve=True) == saved[head]
            else:
                here, there = OmegaConf.select(current, key), OmegaConf.select(cfg, key)
                same = here == there
            if not same:
                raise UserError(f"{key}={here} differs from the checkpoint ({there}); a resumed "
                                "run keeps its dataset/model/prior/divergence/loss")
            continue
        OmegaConf.update(cfg, key, OmegaConf.select(current, key), force_add=True)
    return cfg


class Interrupted(UserError):
    """SIGTERM/SIGINT during training: a checkpoint was saved; exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopFlag:
    """SIGTERM and SIGINT set a flag that the loop reads between steps, so the checkpoint
    is taken at a consistent point; a second SIGINT interrupts at once (atomic writes keep
    the files intact either way)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def training_net(model, opt, compile: bool, device: torch.device):
    """What the training loop calls: the model under DDP when torchrun started several
    processes, and compiled when trainer.compile=true. Only the training step is compiled:
    validation, pictures and checkpoints use the eager model (the same parameters), so
    eval-mode shapes never trigger recompiles."""
    net = distributed.wrap(model, device)
    if compile:
        net = torch.compile(net)
        opt.step = torch.compile(opt.step)  # Adam's per-tensor updates fused into kernels
    return net


def train_epoch(model, opt, data, cfg: DictConfig, order: torch.Generator, state: dict,
                desc: str, stop: StopFlag | None = None) -> dict[str, float] | None:
    """One pass over the training split; metrics stay on the device until the end.

    Returns None when ``stop`` was raised: state["progress"] then holds where the epoch
    stands (batch-order generator state, next batch, metric sums), enough to finish the
    epoch after a resume exactly as if it had not stopped.
    """
    t = cfg.trainer
    device = data.train.device
    progress = state.pop("progress", None)
    epoch_order = progress["order"] if progress else order.get_state()
    order.set_state(epoch_order)
    first = progress["batch"] if progress else 0
    names: list[str] | None = progress["names"] if progress else None
    sums = progress["sums"].to(device) if progress else None
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    n = len(data.train) // t.batch_size
    bar = tqdm(total=n, initial=first, desc=desc, leave=False,
               disable=None if distributed.rank() == 0 else True, dynamic_ncols=True)
    model.train()
    shard = (distributed.rank(), distributed.world())
    batches = shuffled(data.train, t.batch_size, order, data.binarize, first, shard)
    for i, xb in enumerate(batches, start=first):
        with autocast(device, t.precision):
            out = model(xb, state["step"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        state["step"] += 1
        values = torch.stack([v.detach().float() for v in out.values()])
        if sums is None:
            names, sums = list(out), torch.zeros_like(values)
        sums += values
        # Remember the first non-finite step on the device: no host sync per step.
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(values[0]),
                               state["step"], bad_step)
        last = i + 1 == n
        # Ranks agree at the same steps: a signal is acted on at the next such step.
        alone = shard[1] == 1 and stop is not None and stop.signum
        if (i + 1) % t.log_every == 0 or last or alone:
            signum = stop.signum if stop and stop.signum else 0
            flags = torch.stack([bad_step, torch.full_like(bad_step, signum)])
            bad, signum = distributed.all_max(flags).tolist()
            if stop and signum:
                stop.signum = signum
            if bad >= 0:
                raise UserError(f"loss became non-finite at step {bad}; the last "
                                "good checkpoint is kept (lower optim.lr, or "
                                "trainer.detect_anomaly=true to find the operation)")
            bar.set_postfix(loss=f"{values[0].item():.3f}", refresh=False)
            bar.update((i + 1) - bar.n)
            if stop and stop.signum and not last:
                # sums averaged over ranks: a resume on any number of processes adds to them
                state["progress"] = {"order": epoch_order, "batch": i + 1, "names": names,
                                     "sums": distributed.all_mean(sums.clone()).cpu()}
                bar.close()
                return None
    bar.close()
    return dict(zip(names, distributed.all_mean(sums).div(n).tolist(), strict=True))


def train(cfg: DictConfig, run_dir: Path, ckpt: dict | None = None) -> dict:
    """Train from a validated config; writes everything into run_dir. Returns a summary."""
    cfg = validate(cfg)
    t = cfg.trainer
    run_dir = Path(run_dir)
    device = resolve_device(t.device)
    rank, world = distributed.rank(), distributed.world()
    if world > 1:
        if device.type == "cuda":  # torchrun: one GPU per process, chosen by LOCAL_RANK
            device = torch.device("cuda", torch.cuda.current_device())
        if t.batch_size % world:
            raise UserError(f"trainer.batch_size={t.batch_size} (the global batch) must "
                            f"divide among {world} processes")
    writer = rank == 0  # the one process that writes files and logs progress
    if not writer:
        logging.getLogger().setLevel(logging.WARNING)
    seed_all(cfg.seed)

    data = instantiate(cfg.dataset)
    if t.batch_size > len(data.train):
        raise UserError(f"trainer.batch_size={t.batch_size} is larger than the training split "
                        f"({len(data.train)} examples)")
    data = data.to(device)
    vocab = getattr(data, "vocab", None)  # token sequences: a vae_cli.tokens.Vocab
    model = build_model(cfg, data.shape, len(data.train), vocab and len(vocab)).to(device)
    opt = build_optimizer(cfg.optim, model.trainable_parameters())
    state = {"epoch": 0, "step": 0, "best_val": math.inf, "bad_epochs": 0}
    order = torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        for group in opt.param_groups:  # an optim.* override on resume wins over the saved one
            group.update(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                         weight_decay=cfg.optim.weight_decay)
        state.update(ckpt["state"])
        set_rng_state(ckpt["rng"])
        order.set_state(ckpt["rng"]["order"])
        log.info("resumed at epoch %d, step %d", state["epoch"], state["step"])
    log.info("%s on %s%s: %d parameters, data %s x %d", cfg.model._target_, device,
             f" x {world} processes" if world > 1 else "",
             sum(p.numel() for p in model.parameters()), tuple(data.shape), len(data.train))
    model.shard = (rank, world)
    net = training_net(model, opt, t.compile, device)

    ckpt_dir = run_dir / "checkpoints"
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(run_dir / "metrics.csv")
    board = tensorboard(run_dir) if t.tensorboard and writer else None
    show = (as_input(data.val[: t.num_images]), t.num_images, cfg.seed, vocab)
    container = OmegaConf.to_container(cfg, resolve=True)

    def save(name: str) -> Path:
        if not writer:
            return ckpt_dir / name
        checkpoint.save(ckpt_dir / name, {
            "config": container, "shape": list(data.shape), "dataset_size": len(data.train),
            "vocab": vocab.state() if vocab else None,
            "model": model.state_dict(), "optim": opt.state_dict(), "state": dict(state),
            "rng": {**rng_state(), "order": order.get_state()}})
        return ckpt_dir / name

    with StopFlag() as stop, torch.autograd.set_detect_anomaly(t.detect_anomaly):
        while state["epoch"] < t.epochs:
            epoch, start = state["epoch"] + 1, time.perf_counter()
            tr = train_epoch(net, opt, data, cfg, order, state, f"epoch {epoch}/{t.epochs}",
                             stop)
            if tr is None:
                raise interrupted(stop, save("last.pt"), state)
            distributed.check_replicas(model)
            # every rank scores the whole split; rank 0's numbers decide for all
            va = distributed.broadcast(evaluate(model, data.val, t.batch_size, t.precision))
            if not math.isfinite(va["loss"]):
                raise UserError(f"validation loss is non-finite after epoch {epoch}; "
                                "the last good checkpoint is kept (lower optim.lr?)")
            state["epoch"] = epoch
            improved = va["loss"] < state["best_val"]
            state["best_val"] = min(state["best_val"], va["loss"])
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            row = {"epoch": epoch, "step": state["step"],
                   **{f"train_{k}": v for k, v in tr.items()},
                   **{f"val_{k}": v for k, v in va.items()}}
            last = save("last.pt")
            if writer:
                metrics.append(row)  # no wall time in it: same seed, same file (tested)
            if improved and writer:  # the same bytes: copy them rather than serialise twice
                checkpoint.copy(last, ckpt_dir / "best.pt")
            if writer and (epoch % t.image_every == 0 or epoch == t.epochs):
                epoch_pictures(model, show, run_dir / "images", epoch, board, state["step"])
            if board:
                for k, v in row.items():
                    if k not in ("epoch", "step"):
                        board.add_scalar(k.replace("_", "/", 1), v, state["step"])
                board.flush()
            log.info("epoch %d/%d  train %.3f  val %.3f (recon %.3f, div %.3f)%s  %.1fs", epoch,
                     t.epochs, tr["loss"], va["loss"], va["recon"], va["div"],
                     "  *" if improved else "", time.perf_counter() - start)
            stop.signum = distributed.all_max_int(stop.signum or 0, device) or None
            if stop.signum and epoch < t.epochs:
                raise interrupted(stop, ckpt_dir / "last.pt", state)
            if t.patience and state["bad_epochs"] >= t.patience:
                log.info("early stop: no val improvement in %d epochs", t.patience)
                break
    if board:
        board.close()
    if writer:
        write_data_pictures(model, data, "val", run_dir)
        write_curves(run_dir)
    return {"best_val": state["best_val"], "epoch": state["epoch"], "step": state["step"],
            "run_dir": str(run_dir)}


def interrupted(stop: StopFlag, path: Path, state: dict) -> Interrupted:
    name = signal.Signals(stop.signum).name
    return Interrupted(f"{name} at step {state['step']}; saved {path}; continue with: "
                       f"vae train ckpt={path}", stop.signum)


def epoch_pictures(model, show: tuple, folder: Path, epoch: int, board, step: int) -> None:
    """Reconstructions of fixed val images and decodes of prior draws, per epoch (for text,
    one file of greedy samples and reconstructions)."""
    x, n, seed, vocab = show
    model.eval()
    # The same noise every epoch, pushed through the current (possibly learned) prior; the
    # forked RNG leaves training's random stream untouched.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.no_grad():
            z = model.prior.sample(n)
    if vocab:
        epoch_text(model, vocab, x, z, folder / f"text_{epoch:03d}.txt", board, step)
        return
    save_reconstructions(model, x, folder / f"reconstructions_{epoch:03d}.png")
    samples = save_samples(model, z, folder / f"samples_{epoch:03d}.png")
    if board:
        board.add_image("reconstructions", make_grid(reconstruction_rows(model, x).cpu()), step)
        board.add_image("samples", make_grid(samples.float().cpu()), step)


def tensorboard(run_dir: Path):
    """A SummaryWriter under <run>/tensorboard, only when the optional package is there."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("trainer.tensorboard=true needs the tensorboard package: "
                        "pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))
