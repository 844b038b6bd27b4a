"""Learning-rate schedules against their closed forms, gradient clipping, the EMA of
weights, and an exact resume (mid-epoch) of runs that use them."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from test_cli import TINY

from vae_cli.config.build import load_trained
from vae_cli.config.registry import upgrade
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.runtime import checkpoint
from vae_cli.training import lr_schedules as ls
from vae_cli.training.ema import WeightAverage
from vae_cli.training.recipe import fit, setup
from vae_cli.training.resume import resume_config
from vae_cli.training.signals import Interrupted


def _curve(cls, steps: int, per: str, vals=None, **kw) -> list[float]:
    """The lr each of ``steps`` steps/epochs trains with."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cls(opt, **kw)
    out = []
    for i in range(steps):
        out.append(sched.lr)
        opt.step()
        sched.advance(per, vals[i] if vals else None)
    return out


def test_cosine_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    lrs = _curve(ls.Cosine, 40, "step", warmup_epochs=2, min_lr=0.1, steps_per_epoch=5,
                 epochs=8)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    for t in range(10, 40):
        want = 0.1 + 0.9 * (1 + math.cos(math.pi * (t - 10) / 30)) / 2
        assert lrs[t] == pytest.approx(want, abs=1e-9), t


def test_step_exponential_and_staged_follow_their_formulas():
    assert _curve(ls.Step, 7, "epoch", step_epochs=3, gamma=0.5) == pytest.approx(
        [1, 1, 1, .5, .5, .5, .25])
    assert _curve(ls.Exponential, 5, "epoch", gamma=0.9) == pytest.approx(
        [0.9**i for i in range(5)])
    total = ls.Staged.total_epochs()
    lrs = _curve(ls.Staged, total + 5, "epoch")  # Burda et al.: 3^i epochs at 10^(-i/7)
    want = [10 ** (-i / 7) for i in range(8) for _ in range(3**i)] + [10 ** (-1)] * 5
    assert total == 3280 and lrs == pytest.approx(want, rel=1e-9)


def test_plateau_lowers_the_lr_after_patience_epochs_without_improvement():
    vals = [5, 4, 4, 4, 4, 3, 3, 3, 3]
    lrs = _curve(ls.Plateau, 9, "val", vals, factor=0.5, patience=2)
    assert lrs == [1, 1, 1, 1, 1, .5, .5, .5, .5]


def test_a_schedule_moves_only_on_its_own_event():
    assert _curve(ls.Cosine, 3, "epoch", warmup_epochs=0, steps_per_epoch=5,
                  epochs=1) == [1, 1, 1]
    assert _curve(ls.Exponential, 3, "step", gamma=0.5) == [1, 1, 1]


@pytest.mark.parametrize("cls, kw, key", [
    (ls.Cosine, {"warmup_epochs": 8.0, "steps_per_epoch": 5, "epochs": 8}, "warmup_epochs"),
    (ls.Cosine, {"min_lr": 2.0, "steps_per_epoch": 5, "epochs": 8}, "min_lr=2.0 must be >= 0 "
     "and at most optim.lr=1"),
    (ls.Step, {"gamma": 0.0}, "gamma"), (ls.Staged, {"decay": -1.0}, "decay")])
def test_impossible_settings_are_one_line(cls, kw, key):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match=f"lr_scheduler.{key}"):
        cls(opt, **kw)


def test_ema_is_the_warmed_up_exponential_average():
    lin = torch.nn.Linear(1, 1, bias=False)
    ema, avg = WeightAverage(lin, decay=0.9), lin.weight.detach().clone()
    for t in range(1, 30):
        with torch.no_grad():
            lin.weight.fill_(float(t))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * t
        assert ema.shadow["weight"].item() == pytest.approx(avg.item(), rel=1e-6)
    with ema.applied():
        assert lin.weight.item() == pytest.approx(avg.item(), rel=1e-6)
    assert lin.weight.item() == 29.0  # its own weights back


def test_ema_refuses_saved_averages_of_another_shape():
    # copy_ would broadcast a doctored file's (1, 1) average over a (3, 2) weight
    ema = WeightAverage(torch.nn.Linear(2, 3, bias=False), decay=0.9)
    with pytest.raises(ValueError, match=r"'weight' of shape \[1, 1\]"):
        ema.load_state_dict({"weight": torch.ones(1, 1)}, updates=5)
    ema.load_state_dict({"weight": torch.ones(3, 2)}, updates=5)
    assert ema.shadow["weight"].sum() == 6 and ema.updates == 5


def _cfg(compose, tmp: Path, *extra: str):
    return validate_train(compose([*TINY, f"dataset.root={tmp / 'data'}", "trainer.epochs=3",
                                   "trainer.log_every=1", *extra]))


def _stopped_at(step: int):
    def hook(s: int, metrics: dict) -> None:
        if s == step:  # a real SIGTERM, caught by the run's own handler
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def _state(run: Path) -> tuple[list, dict]:
    ckpt = checkpoint.load(run / "checkpoints/last.pt")
    return ckpt["state"]["rows"], {**ckpt["model"], **{f"ema.{k}": v for k, v in
                                                      (ckpt.get("ema") or {}).items()}}


@pytest.mark.parametrize("extra", [
    ("lr_scheduler=cosine", "trainer.ema=0.9", "trainer.grad_clip=5.0"),
    ("lr_scheduler=plateau", "lr_scheduler.patience=0", "trainer.precision=fp16",
     "trainer.grad_clip=50.0")])
def test_resume_mid_epoch_is_exact_with_schedules_ema_and_clipping(compose_cfg, tmp_path,
                                                                    extra):
    cfg = _cfg(compose_cfg, tmp_path, *extra)
    fit(setup(cfg, tmp_path / "full"))
    cut = setup(cfg, tmp_path / "cut")
    cut.stepper.hooks.on_log.append(_stopped_at(12))  # inside epoch 2 (8 steps an epoch)
    with pytest.raises(Interrupted):
        fit(cut)
    path = tmp_path / "cut/checkpoints/last.pt"
    ckpt = checkpoint.load(path)
    assert ckpt["state"]["progress"]["batch"] == 4
    fit(setup(validate_train(resume_config(upgrade(ckpt["config"]), cfg, [])),
              tmp_path / "cut", ckpt, path))
    (rows_a, weights_a), (rows_b, weights_b) = _state(tmp_path / "full"), _state(
        tmp_path / "cut")
    assert rows_a == rows_b and weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all("train_grad_norm" in r and "lr" in r for r in rows_a)


def test_validation_pictures_and_eval_use_the_averaged_weights(compose_cfg, tmp_path):
    run = setup(_cfg(compose_cfg, tmp_path, "trainer.ema=0.8", "trainer.epochs=2"),
                tmp_path / "run")
    seen = []  # (eval mode?, weights equal the average?) at each encoder call
    first = next(iter(run.ema.shadow))

    def record(module, args):
        live = run.objective.model.state_dict()[first]
        seen.append((not module.training, torch.equal(live, run.ema.shadow[first])))
    run.objective.model.encoder.register_forward_pre_hook(record)
    fit(run)
    assert {averaged for evaluating, averaged in seen if evaluating} == {True}
    training = [averaged for evaluating, averaged in seen if not evaluating]
    assert training[0] and not any(training[1:])  # the average starts as the weights
    ckpt = checkpoint.load(tmp_path / "run/checkpoints/last.pt")
    objective, _ = load_trained(str(tmp_path / "run/checkpoints/last.pt"), torch.device("cpu"))
    loaded = objective.model.state_dict()
    assert all(torch.equal(loaded[k], ckpt["ema"][k]) for k in loaded)
    assert not all(torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in loaded)


def test_clipping_bounds_the_update_and_logs_the_norm_before_it(compose_cfg, tmp_path):
    cfg = _cfg(compose_cfg, tmp_path, "trainer.grad_clip=1e-3", "optim=sgd", "optim.lr=1.0",
               "optim.momentum=0.0", "trainer.epochs=1")
    run = setup(cfg, tmp_path / "run")
    before = [p.detach().clone() for p in run.objective.main_parameters()]
    terms = run.stepper(run.data.train[:32].float() / 255, 0)
    step = torch.cat([(p.detach() - b).flatten() for p, b in
                      zip(run.objective.main_parameters(), before, strict=True)])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped grad
    assert terms["grad_norm"].item() > 1e-3


def test_changing_the_lr_of_a_scheduled_run_on_resume_is_refused(compose_cfg, tmp_path):
    cfg = _cfg(compose_cfg, tmp_path, "lr_scheduler=exponential", "trainer.epochs=1")
    fit(setup(cfg, tmp_path / "run"))
    path = tmp_path / "run/checkpoints/last.pt"
    ckpt = checkpoint.load(path)
    again = resume_config(upgrade(ckpt["config"]), _cfg(compose_cfg, tmp_path,
                          "trainer.epochs=2", "optim.lr=0.5"), ["optim.lr=0.5"])
    with pytest.raises(UserError, match="optim.lr=0.5 differs"):
        setup(validate_train(again), tmp_path / "run", ckpt, path)


def test_a_checkpoint_from_before_schedules_loads_with_none():
    cfg = upgrade({"optim": {"name": "adam", "lr": 1e-3}})
    assert cfg["lr_scheduler"] == {"_target_": "vae_cli.training.lr_schedules.LRSchedule"}
