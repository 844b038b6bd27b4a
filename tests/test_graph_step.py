"""trainer.cuda_graph=true: the graph-safe step (static inputs, the step and the learning
rate as device tensors) run eagerly on CPU takes the ordinary step's weights and metrics
bit for bit, so on CUDA it differs only by capture; the warm-up that capture needs leaves
no trace; what it cannot hold is refused in one line."""

from __future__ import annotations

import pytest
import torch
from hostile import in_process

from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train
from vae_cli.objective.schedules import Capacity, Cyclical, Linear, Logistic
from vae_cli.training.graph import GraphStepper, graph_safe, refusal, rehearsal
from vae_cli.training.lr_schedules import Cosine
from vae_cli.training.optimizers import build_optimizer
from vae_cli.training.step import Stepper

TINY = ["dataset.image_size=16", "model.hidden=[32]", "model.latent_dim=4",
        "schedule=linear", "schedule.warmup_steps=5"]
# the two-level HVAE with a VampPrior on its top layer (the VampPrior paper's best row)
HVAE = ["dataset.image_size=16", "model=hvae", "model.hidden=32", "model.latent_dim=4",
        "model.top_dim=3", "prior=vamp", "prior.components=5", "schedule=linear",
        "schedule.warmup_steps=5"]


@pytest.mark.parametrize("schedule", [Linear(7, 0.1), Logistic(0.3, 4), Cyclical(5, 2, 0.6),
                                      Capacity(3.0, 6, 10.0)])
def test_a_schedule_gives_the_same_float32_term_for_a_step_number_or_tensor(schedule):
    div = torch.tensor(2.7182817)
    for step in range(15):
        plain = schedule.term(div, 0.7, step)
        on_device = schedule.term(div, 0.7, torch.tensor(step, dtype=torch.float64))
        assert on_device.dtype == torch.float32 and torch.equal(plain, on_device), step


def _stepper(compose, graph: bool, *extra: str, base: list[str] = TINY):
    torch.manual_seed(0)
    cfg = validate_train(compose([*base, *extra]))
    objective = build_objective(cfg, (1, 16, 16), 256)
    opt = build_optimizer(cfg.optim, objective.main_parameters(), compiled=False)
    step = Stepper(objective, objective, opt, torch.device("cpu"), grad_clip=2.0)
    schedule = Cosine(opt, steps_per_epoch=4, epochs=3)
    step.hooks.after_update.append(lambda n: schedule.advance("step"))
    return (graph_safe(step, capture=False) if graph else step), objective


@pytest.mark.parametrize("base", [TINY, HVAE], ids=["mlp", "hvae-vamp"])
def test_the_graph_safe_step_takes_the_ordinary_steps_weights_and_metrics(compose_cfg, base):
    plain, a = _stepper(compose_cfg, False, base=base)
    safe, b = _stepper(compose_cfg, True, base=base)
    assert isinstance(safe, GraphStepper)
    assert all(isinstance(g["lr"], torch.Tensor) for g in safe.opt.param_groups)
    torch.manual_seed(1)
    batches = [torch.rand(16, 1, 16, 16).round() for _ in range(12)]
    for i, x in enumerate(batches):
        torch.manual_seed(100 + i)  # the same sampling noise on both sides
        p = plain(x, i)
        torch.manual_seed(100 + i)
        s = safe(x, i)
        assert list(p) == list(s) and all(torch.equal(p[k], s[k]) for k in p), i
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))
    lr = safe.opt.param_groups[0]["lr"]
    assert float(lr) == plain.opt.param_groups[0]["lr"] < 1e-3  # the cosine moved it


def test_the_warm_up_before_capture_leaves_no_trace(compose_cfg):
    safe, objective = _stepper(compose_cfg, True)
    x = torch.rand(16, 1, 16, 16).round()
    safe(x, 0)  # Adam's state exists
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in safe.opt.state.values()]
    rng = torch.get_rng_state()
    with rehearsal(objective, safe.opt, torch.device("cpu")):
        for _ in range(3):
            safe.body()
            torch.rand(5)
    assert all(torch.equal(before[k], v) for k, v in objective.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, safe.opt.state.values(),
                                                            strict=True))
    assert torch.equal(rng, torch.get_rng_state())
    # state created inside it (a fresh optimizer) goes back to Adam's zeros
    fresh, objective = _stepper(compose_cfg, True)
    fresh.inputs = (x, None)
    with rehearsal(objective, fresh.opt, torch.device("cpu")):
        fresh.opt.zero_grad()
        fresh.body()
    assert all(torch.count_nonzero(s["exp_avg"]) == 0 and s["step"] == 0
               for s in fresh.opt.state.values())


def test_a_graph_safe_run_equals_the_ordinary_run_and_resumes_either_way(tmp_path):
    common = [*TINY, "dataset.n_train=256", "dataset.n_val=32", "dataset.n_test=32",
              "trainer.batch_size=32", "trainer.pictures=false", "trainer.ema=0.9",
              "lr_scheduler=exponential", f"dataset.root={tmp_path / 'data'}"]
    runs = {}
    for graph in ("false", "true"):
        runs[graph] = tmp_path / graph
        in_process("train", *common, "trainer.epochs=2", f"trainer.cuda_graph={graph}",
                   f"hydra.run.dir={runs[graph]}", cwd=tmp_path)
    assert (runs["true"] / "metrics.csv").read_text() == \
           (runs["false"] / "metrics.csv").read_text()
    # a graph-safe checkpoint (its lr a tensor) continues as an ordinary run, and back
    for graph, other in (("true", "false"), ("false", "true")):
        half = tmp_path / f"half-{graph}"
        in_process("train", *common, "trainer.epochs=1", f"trainer.cuda_graph={graph}",
                   f"hydra.run.dir={half}", cwd=tmp_path)
        in_process("train", f"ckpt={half / 'checkpoints/last.pt'}", "trainer.epochs=2",
                   f"trainer.cuda_graph={other}", cwd=tmp_path)
        assert (half / "metrics.csv").read_text() == \
               (runs["false"] / "metrics.csv").read_text()


@pytest.mark.parametrize("override, why", [
    ("trainer.accumulate=2", "trainer.accumulate > 1"),
    ("trainer.precision=fp16", "trainer.precision=fp16"),
    ("trainer.compile=true", "trainer.compile=true"),
    ("divergence=adversarial", "a network trained beside the model"),
    ("posterior=planar", "posterior=planar"),
])
def test_what_the_graph_safe_step_cannot_hold_is_one_line(compose_cfg, override, why):
    cfg = validate_train(compose_cfg([*TINY, "trainer.cuda_graph=true", override]))
    message = refusal(build_objective(cfg, (1, 16, 16), 256), cfg.trainer, 1)
    assert message.startswith("trainer.cuda_graph=true cannot take") and why in message
    assert refusal(build_objective(validate_train(compose_cfg(TINY)), (1, 16, 16), 256),
                   validate_train(compose_cfg(TINY)).trainer, 1) is None


def test_a_refused_run_stops_before_any_work_in_one_line(tmp_path):
    done = in_process("train", *TINY, "trainer.cuda_graph=true", "trainer.accumulate=2",
                      f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'r'}",
                      cwd=tmp_path, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "trainer.cuda_graph=true cannot take trainer.accumulate > 1" in done.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
