"""The training recipe: ``setup`` builds every object once, ``fit`` runs the epochs,
``save_checkpoint`` writes one. Read top to bottom."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vae_cli.config import limits
from vae_cli.config.build import build_objective, planned_parameters
from vae_cli.config.components import instantiate
from vae_cli.data.base import Splits
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError, one_line
from vae_cli.evaluation.evaluate import evaluate
from vae_cli.objective.bounds import Objective
from vae_cli.objective.parallel import Shard
from vae_cli.reports.trackers import Tracker
from vae_cli.reports.training import TrainingReports
from vae_cli.runtime import checkpoint, distributed
from vae_cli.runtime.device import resolve_device
from vae_cli.runtime.rng import rng_state, seed_all, set_rng_state
from vae_cli.runtime.run_folder import RunFolder, read_metrics, write_metrics
from vae_cli.training import graph
from vae_cli.training.ema import WeightAverage
from vae_cli.training.loop import StopRequested, train_epoch
from vae_cli.training.lr_schedules import LRSchedule
from vae_cli.training.optimizers import build_optimizer, load_optimizer, override_settings
from vae_cli.training.resume import check_data
from vae_cli.training.signals import Interrupted, Signalled, StopFlag
from vae_cli.training.state import TrainState
from vae_cli.training.step import SkipRule, Stepper

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: DictConfig  # validated
    run_dir: Path
    data: Splits  # on the training device
    objective: Objective
    stepper: Stepper
    state: TrainState
    order: torch.Generator  # batch order, on the CPU so it is device-independent
    writer: bool  # rank 0: the one process that writes files
    lr_schedule: LRSchedule
    ema: WeightAverage | None = None
    resumed_from: Path | None = None  # the checkpoint file this run continues
    tracker: Tracker = field(default_factory=Tracker)  # logger=; rank 0's, csv elsewhere

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    def weights_shown(self) -> contextlib.AbstractContextManager:
        """The weights validation, pictures and evaluation use: the EMA when kept."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()


def setup(cfg: DictConfig, run_dir: Path, ckpt: dict | None = None,
          ckpt_path: Path | None = None) -> Run:
    """Device, data, objective and optimizers from a validated config; restored from
    ``ckpt`` (the checkpoint loaded from ``ckpt_path``) when given."""
    t = cfg.trainer
    device, shard = placement(t)
    if shard.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    # first, so that a tracker's missing package stops the run before any work
    tracker = instantiate("logger", cfg.logger) if shard.rank == 0 else Tracker()
    seed_all(cfg.seed)
    # A text run continues with its own vocabulary, never one rebuilt from an edited file.
    vocab = Vocab.from_state(ckpt.get("vocab")) if ckpt else None
    data = instantiate("dataset", cfg.dataset, vocab=vocab.itos if vocab else None)
    check_fit(cfg, data, ckpt)
    data = data.to(device)
    if cfg.model.get("conditional") and data.num_classes:
        data.check_class_ids()
    args = (cfg, data.shape, len(data.train), data.vocab and len(data.vocab), data.num_classes)
    limits.check_parameters(planned_parameters(*args), cfg)  # before memory is taken
    objective = build_objective(*args)
    objective.model.likelihood.ready()
    size = sum(p.numel() for p in objective.parameters())
    limits.check_parameters(size, cfg)
    objective = objective.to(device)
    why = graph.refusal(objective, t, shard.world) if t.cuda_graph else None
    if why:
        raise UserError(why)
    capture = t.cuda_graph and device.type == "cuda"
    opt = build_optimizer(cfg.optim, objective.main_parameters(), t.compile, capture)
    aux_opts = [a.auxiliary_optimizer() for a in objective.auxiliaries()]
    stepper = Stepper(training_net(objective, opt, t.compile, device), objective, opt, device,
                      t.precision, shard, aux_opts, distributed.average_grads,
                      scaler=torch.amp.GradScaler(device.type) if t.precision == "fp16"
                      else None, grad_clip=t.grad_clip,
                      skip=SkipRule(t.skip_threshold, t.skip_limit) if t.skip_threshold
                      else None)
    schedule = instantiate("lr_scheduler", cfg.lr_scheduler, opt, epochs=t.epochs,
                           steps_per_epoch=-(-(len(data.train) // t.batch_size)
                                             // t.accumulate))
    ema = WeightAverage(objective.model, t.ema) if t.ema else None
    state, order = TrainState(), torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None:
        check_position(ckpt, cfg)
        check_schedule_span(ckpt, cfg, schedule)
        state = restore(ckpt, objective, stepper, schedule, ema, cfg, order, ckpt_path)
    if t.cuda_graph:  # after restore: the saved lr becomes the device tensor it updates
        stepper = graph.graph_safe(stepper, capture)
    stepper.hooks.after_update.append(lambda step: schedule.advance("step"))
    if ema:
        stepper.hooks.after_update.append(lambda step: ema.update())
    log.info("%s on %s%s: %d parameters, data %s x %d", cfg.model._target_, device,
             f" x {shard.world} processes" if shard.world > 1 else "",
             size, tuple(data.shape), len(data.train))
    return Run(cfg, Path(run_dir), data, objective, stepper, state, order, shard.rank == 0,
               schedule, ema, ckpt_path, tracker)


def placement(t) -> tuple[torch.device, Shard]:
    """This process's device and its slice of each batch (several under torchrun)."""
    device = resolve_device(t.device)
    shard = Shard(distributed.rank(), distributed.world())
    if shard.world > 1:
        if device.type == "cuda":  # torchrun: one GPU per process, chosen by LOCAL_RANK
            device = torch.device("cuda", torch.cuda.current_device())
        if t.batch_size % shard.world:
            raise UserError(f"trainer.batch_size={t.batch_size} (the global batch) must "
                            f"divide among {shard.world} processes")
    return device, shard


def check_position(ckpt: dict, cfg: DictConfig) -> None:
    """A run stopped inside an epoch continues that epoch's batch order at a batch index:
    only the same batch size and bucketing give those indices the same meaning."""
    saved = ckpt["config"].get("trainer") or {}
    for key, default in (("batch_size", None), ("bucket", False)):
        now, then = cfg.trainer[key], saved.get(key, default)
        if ckpt["state"].get("progress") and now != then:
            now, then = str(now).lower(), str(then).lower()  # as overrides spell them
            raise UserError(f"trainer.{key}={now} differs from the interrupted epoch's "
                            f"({then}); resume with trainer.{key}={then}, the epoch's "
                            "position depends on it")


def check_schedule_span(ckpt: dict, cfg: DictConfig, schedule: LRSchedule) -> None:
    """A schedule laid over the whole run (cosine) continues only over that run: changing
    its length on resume would bend the curve it is half-way along."""
    if not schedule.spans_run:
        return
    saved = ckpt["config"].get("trainer") or {}
    name = str(cfg.lr_scheduler._target_).rpartition(".")[2].lower()
    for key in ("epochs", "batch_size", "accumulate"):
        now, then = cfg.trainer[key], saved.get(key)
        if then is not None and now != then:
            raise UserError(f"trainer.{key}={now} differs from the checkpoint's ({then}), and "
                            f"lr_scheduler={name} anneals over the run it was set for; resume "
                            f"with trainer.{key}={then}, or start a new run")


def check_fit(cfg: DictConfig, data: Splits, ckpt: dict | None) -> None:
    """The data fits the trainer's settings, and a resumed run's checkpoint."""
    t = cfg.trainer
    if t.batch_size > len(data.train):
        raise UserError(f"trainer.batch_size={t.batch_size} is larger than the training split "
                        f"({len(data.train)} examples)")
    if t.bucket and data.vocab is None:
        raise UserError(f"trainer.bucket=true groups token sequences by length, but "
                        f"{data.name} gives images; leave trainer.bucket=false")
    if ckpt:
        check_data(ckpt, cfg.dataset, data.shape, len(data.train))


def restore(ckpt: dict, objective: Objective, stepper: Stepper, schedule: LRSchedule,
            ema: WeightAverage | None, cfg: DictConfig, order: torch.Generator,
            path: Path | None = None) -> TrainState:
    """Weights, optimizer moments, schedules, random streams and counters from a
    checkpoint; optim settings given now (an optim.lr= override) win over the saved ones."""
    try:
        objective.model.load_state_dict(ckpt["model"])
        objective.divergence.load_state_dict(ckpt.get("divergence") or {})
        load_optimizer(stepper.opt, ckpt["optim"])
        saved = ckpt.get("aux_optim")  # one state dict before there could be several
        saved = [saved] if isinstance(saved, dict) else saved or []
        for opt, state in zip(stepper.aux_opts, saved, strict=True):
            opt.load_state_dict(state)
        if stepper.scaler is not None and ckpt.get("scaler"):
            stepper.scaler.load_state_dict(ckpt["scaler"])
        schedule.load_state_dict(ckpt.get("lr_scheduler") or {})
        state = TrainState.from_dict(ckpt["state"])
        if ema is not None:  # a run that starts averaging on resume starts from here
            ema.load_state_dict(ckpt.get("ema") or ckpt["model"],
                                state.step if ckpt.get("ema") else 0)
        set_rng_state(ckpt["rng"])
        order.set_state(ckpt["rng"]["order"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        reason = one_line(e, chain=True)
        raise UserError(f"{path or 'the checkpoint'} cannot be resumed: its training state "
                        f"does not fit this run ({reason})") from None
    override_settings(stepper.opt, cfg.optim, ckpt, scheduled=schedule.scheduler is not None)
    log.info("resumed at epoch %d, step %d", state.epoch, state.step)
    return state


def training_net(objective: Objective, opt: torch.optim.Optimizer, compile: bool,
                 device: torch.device) -> torch.nn.Module:
    """What the training step calls: the objective under DDP when torchrun started several
    processes, and compiled when trainer.compile=true. Only the training step is compiled:
    validation, pictures and checkpoints use the eager modules (the same parameters), so
    eval-mode shapes never trigger recompiles."""
    net = distributed.wrap(objective, device)
    if distributed.world() > 1:  # statistics a family keeps (VQ's EMA) over the global batch
        objective.model.family.distribute(distributed.all_sum)
    if compile:
        check_compilable(objective, device)
        net = torch.compile(net)
        opt.step = torch.compile(opt.step)  # Adam's per-tensor updates fused into kernels
    return net


def check_compilable(objective: Objective, device: torch.device) -> None:
    """Compiled convolutions on CUDA are refused: with torch 2.11 on an H100, Inductor's
    compiled backward failed a layout assertion in convolution_backward, and with layout
    optimisation off the compiled model did not learn (val loss 792 against 190 eager).
    CPU compiles them correctly (tested). VAE_COMPILE_CONV_CUDA=1 tries anyway, which is
    how bench/gpu_check.sh tests whether a torch release has fixed it."""
    convs = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in objective.modules())
    if device.type == "cuda" and convs and os.environ.get("VAE_COMPILE_CONV_CUDA") != "1":
        raise UserError(f"trainer.compile=true with a convolutional model on CUDA is refused "
                        f"(torch {torch.__version__}: Inductor's compiled convolution backward "
                        "fails or trains wrongly); use trainer.compile=false")


def save_checkpoint(run: Run, path: Path) -> Path:
    """Everything a resume needs, written atomically by rank 0."""
    if not run.writer:
        return path
    check_run_dir(run)
    path.parent.mkdir(exist_ok=True)
    stepper, vocab = run.stepper, run.data.vocab
    config = OmegaConf.to_container(run.cfg, resolve=True)
    # how this start was launched is not part of the run: the same run, however often
    # resumed, saves the same bytes
    config["ckpt"], config["trainer"]["resume"] = None, False
    checkpoint.save(path, {
        "config": config,
        "shape": list(run.data.shape), "dataset_size": len(run.data.train),
        "num_classes": run.objective.model.num_classes or None,  # what a conditional reads
        "vocab": vocab.state() if vocab else None,
        "model": run.objective.model.state_dict(),
        "divergence": run.objective.divergence.state_dict(),
        "optim": stepper.opt.state_dict(),
        "aux_optim": [opt.state_dict() for opt in stepper.aux_opts],
        "scaler": stepper.scaler.state_dict() if stepper.scaler else None,
        "lr_scheduler": run.lr_schedule.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "state": run.state.to_dict(), "rng": {**rng_state(), "order": run.order.get_state()}})
    return path


def fit(run: Run) -> dict:
    """Epochs until trainer.epochs, early stopping or a signal, then the final pictures;
    writes everything into the run folder and sends it to the tracker. A signal at any
    point, the final validation and pictures included, leaves a resumable last.pt and
    raises Interrupted."""
    state, reports = run.state, open_reports(run)
    status = "failed"
    with StopFlag() as stop, torch.autograd.set_detect_anomaly(run.cfg.trainer.detect_anomaly):
        try:
            train_epochs(run, stop, reports)
            if reports and run.cfg.trainer.pictures:
                check_run_dir(run)
                with run.weights_shown():
                    reports.final(state.step)
            if agreed_signal(run, stop):  # during the final validation or pictures
                raise Interrupted(stop.signum, state.step, run.folder.last)
            if reports:
                best = run.folder.best
                reports.finish(best if best.is_file() else run.folder.last)
            status = "finished"
        except (Interrupted, Signalled):
            status = "interrupted"
            raise
        except Exception as e:
            failed = run.cfg.trainer.compile and compile_failure(e)
            if failed:
                raise failed from e
            raise
        finally:
            if reports:
                run.stepper.hooks.on_log.remove(reports.step)
                reports.close(status)
    return {"best_val": state.best_val, "epoch": state.epoch, "step": state.step,
            "run_dir": str(run.run_dir)}


def compile_failure(e: BaseException) -> UserError | None:
    """torch.compile's own failure (no working C++ compiler, an operation it cannot
    trace) as one line that names the way round it; None for any other error."""
    if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    return UserError(f"trainer.compile=true: torch.compile failed ({one_line(e)}); "
                     "trainer.compile=false trains without it")


def open_reports(run: Run) -> TrainingReports | None:
    """Rank 0's reports, its tracker started (continuing the tracker's run on a resume)
    and fed the loop's running loss; None on other ranks."""
    if not run.writer:
        return None
    t = run.cfg.trainer
    run.run_dir.mkdir(parents=True, exist_ok=True)
    reconcile(run)
    reports = TrainingReports(run.objective.model, run.data, run.run_dir, t.num_images,
                              run.cfg.seed, run.tracker)
    reports.start(OmegaConf.to_container(run.cfg, resolve=True),
                  run.state.step if run.resumed_from else None, run.state.rows)
    run.stepper.hooks.on_log.append(reports.step)
    return reports


def train_epochs(run: Run, stop: StopFlag, reports: TrainingReports | None) -> None:
    """Each epoch: train, validate, checkpoint, metrics.csv, report; stops at
    trainer.epochs, on early stopping, at trainer.max_minutes, or with Interrupted on a
    signal."""
    t, state = run.cfg.trainer, run.state
    started, durations = time.monotonic(), []
    while state.epoch < t.epochs and not patience_spent(t, state):
        epoch_start = time.monotonic()
        row, improved = run_epoch(run, stop)
        save_checkpoint(run, run.folder.last)
        if run.writer:
            check_run_dir(run)
            write_metrics(run.folder.metrics, state.rows)
            if improved:  # the same bytes: copy them rather than serialise twice
                checkpoint.copy(run.folder.last, run.folder.best)
            with run.weights_shown():
                reports.epoch(state.epoch, state.step, row, t.pictures and (
                    state.epoch % t.image_every == 0 or state.epoch == t.epochs))
        if agreed_signal(run, stop) and state.epoch < t.epochs:
            raise Interrupted(stop.signum, state.step, run.folder.last)
        if patience_spent(t, state):
            log.info("early stop: no val improvement in %d epochs", t.patience)
            break
        durations.append(time.monotonic() - epoch_start)
        if state.epoch < t.epochs and out_of_time(run, started, durations):
            log.info("time limit: another epoch would pass trainer.max_minutes=%g; stopped "
                     "after epoch %d (trainer.resume=true continues)", t.max_minutes,
                     state.epoch)
            break


def patience_spent(t: DictConfig, state: TrainState) -> bool:
    """Early stopping's rule: trainer.patience epochs without a better validation loss.
    Checked before each epoch too, so that a run the rule ended stays ended when started
    again (bench/reproduce.sh starts every stage with trainer.resume=auto)."""
    return bool(t.patience) and state.bad_epochs >= t.patience


def out_of_time(run: Run, started: float, durations: list[float]) -> bool:
    """Whether one more epoch, as long as ``next_epoch`` predicts, would end past
    trainer.max_minutes of this invocation; rank 0's clock decides for every rank."""
    limit = run.cfg.trainer.max_minutes
    if limit is None:
        return False
    elapsed = time.monotonic() - started
    late = int(run.writer and elapsed + next_epoch(durations) > 60 * limit)
    return bool(distributed.all_max_int(late, run.stepper.device))


def next_epoch(durations: list[float]) -> float:
    """The next epoch's expected seconds: the median of the last five epochs', so that
    one epoch stretched by a pause (a suspended job, a busy machine) does not end a
    budget hours early, while a lasting slowdown shows within three epochs."""
    return statistics.median(durations[-5:])


def check_run_dir(run: Run) -> None:
    """Before each write: a run folder removed under a running run is not recreated."""
    if not run.run_dir.is_dir():
        raise UserError(f"the run folder {run.run_dir} was removed during training; "
                        "stopping without recreating it")


def reconcile(run: Run) -> None:
    """The run folder as an uninterrupted run would have it at the resumed checkpoint: a
    process killed after saving last.pt but before writing metrics.csv or copying best.pt
    left them one epoch behind."""
    state = run.state
    if not state.rows and state.epoch:  # a checkpoint from before rows were kept in it
        state.rows = read_metrics(run.folder.metrics)[: state.epoch]
    write_metrics(run.folder.metrics, state.rows)
    best = run.folder.best
    source = run.resumed_from
    if (source is not None and state.progress is None and state.epoch > 0
            and state.best_epoch == state.epoch and source.resolve() != best.resolve()):
        checkpoint.copy(source, best)


def agreed_signal(run: Run, stop: StopFlag) -> int | None:
    """The signal any rank received (ranks stop together), or None."""
    stop.signum = distributed.all_max_int(stop.signum or 0, run.stepper.device) or None
    return stop.signum


def run_epoch(run: Run, stop: StopFlag) -> tuple[dict, bool]:
    """Train one epoch, score the validation split, update the counters; returns the
    metrics row and whether validation improved."""
    t, state = run.cfg.trainer, run.state
    epoch, start = state.epoch + 1, time.perf_counter()
    try:
        tr = train_epoch(run.stepper, run.data, t, run.order, state, stop,
                         f"epoch {epoch}/{t.epochs}")
    except StopRequested:
        raise Interrupted(stop.signum, state.step, save_checkpoint(run, run.folder.last)) from None
    distributed.check_replicas(run.objective)
    lr = run.lr_schedule.lr  # the epoch's (a per-step schedule's: its last step's)
    labels = run.data.labels_for("val", run.objective.model.conditional)
    with run.weights_shown():  # every rank scores the whole split; rank 0's numbers decide
        va = distributed.broadcast(evaluate(run.objective, run.data.val, t.batch_size,
                                            t.precision, labels))
    if not math.isfinite(va["loss"]):
        raise UserError(f"validation loss is non-finite after epoch {epoch}; "
                        "the last good checkpoint is kept (lower optim.lr?)")
    run.lr_schedule.advance("epoch")
    run.lr_schedule.advance("val", va["loss"])
    state.epoch = epoch
    improved = va["loss"] < state.best_val
    state.best_val = min(state.best_val, va["loss"])
    state.best_epoch = epoch if improved else state.best_epoch
    # Epochs before the divergence's schedule settles do not count towards patience.
    settled = state.step >= run.objective.schedule.settles_at
    state.bad_epochs = 0 if improved or not settled else state.bad_epochs + 1
    log.info("epoch %d/%d  train %.3f  val %.3f (recon %.3f, div %.3f)%s  %.1fs", epoch,
             t.epochs, tr["loss"], va["loss"], va["recon"], va["div"],
             "  *" if improved else "", time.perf_counter() - start)
    row = {"epoch": epoch, "step": state.step, **{f"train_{k}": v for k, v in tr.items()},
           **{f"val_{k}": v for k, v in va.items()}, "lr": lr}
    state.rows.append(row)
    return row, improved
