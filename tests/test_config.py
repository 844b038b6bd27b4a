"""Start-up validation: wrong types and impossible values fail with one clear line."""

import pytest

from vae_cli.config.build import build_objective
from vae_cli.config.registry import check_targets, locate, registry
from vae_cli.config.schemas import validate_train as validate
from vae_cli.errors import UserError
from vae_cli.training.optimizers import build_optimizer


def test_default_config_validates_and_builds(compose_cfg):
    cfg = validate(compose_cfg())
    assert cfg.trainer.device == "auto"
    objective = build_objective(cfg, (1, 32, 32), 100)
    assert objective.model.latent_dim == cfg.model.latent_dim


@pytest.mark.parametrize("override", [
    "model=conv", "loss=gaussian", "optim=adamw", "optim=sgd", "divergence.beta=4",
    "model.latent_dim=3", "optim._target_=torch.optim.Adamax",
    "trainer.device=cpu", "trainer.patience=3", "divergence.estimator=mc",
    "model.activation=gated", "logger=tensorboard", "logger=mlflow", "logger=wandb",
])
def test_valid_overrides(compose_cfg, override):
    validate(compose_cfg([override]))


@pytest.mark.parametrize("overrides, fragment", [
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["trainer.batch_size=-5"], "trainer.batch_size"),
    (["model.latent_dim=0"], "model.latent_dim"),
    (["model.latent_dim=2.5"], "model.latent_dim"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.precision=fp8"], "trainer.precision"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim._target_=torch.optim.Sgdx"], "optim._target_"),
    (["optim._target_=os.system"], "optim._target_"),
    (["+optim.momentum=0.9"], "optim.momentum"),  # Adam has no momentum
    (["optim.lr=fast"], "optim.lr"),
    (["divergence.beta=high"], "divergence.beta"),
    (["+model.depth=3"], "model.depth"),
    (["+dataset.colour=1"], "dataset.colour"),
    (["seed=x"], "seed"),
    (["trainer.patience=0"], "trainer.patience"),
    (["trainer.max_minutes=0"], "trainer.max_minutes"),
    (["model.hidden=5"], "model.hidden"),
    (["logger=wandb", "logger.mode=upload"], "logger.mode"),
    (["logger=mlflow", "+logger.uri=x"], "logger.uri"),
    (["logger=mlflow", "logger.tags=3"], "logger.tags"),
    (["+trainer.tensorboard=true"], "trainer.tensorboard"),
])
def test_bad_values_fail_with_the_key_named(compose_cfg, overrides, fragment):
    with pytest.raises(UserError) as e:
        validate(compose_cfg(overrides))
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_targets_outside_the_package_are_refused():
    with pytest.raises(UserError, match="outside vae_cli"):
        locate("model", "os.system")
    with pytest.raises(UserError, match="outside vae_cli"):
        check_targets({"model": {"_target_": "builtins.eval"}})
    with pytest.raises(UserError, match="outside vae_cli"):
        check_targets({"a": [{"b": {"_target_": "subprocess.call"}}]})


def test_targets_are_registered_per_group():
    # A package function that is not a component, or a component of another group, is
    # refused as surely as a foreign one.
    for group, target in [("loss", "vae_cli.commands.compare.main"),
                          ("loss", "vae_cli.nets.mlp.build"),
                          ("model", "vae_cli.objective.likelihoods.Bernoulli"),
                          ("dataset", "vae_cli.nets.mlp.build"),
                          ("optim", "torch.optim.lr_scheduler.StepLR")]:
        with pytest.raises(UserError, match="outside vae_cli"):
            locate(group, target)
        with pytest.raises(UserError, match="outside vae_cli"):
            check_targets({group: {"_target_": target}})
    with pytest.raises(UserError, match="outside vae_cli"):  # nested: never a component
        check_targets({"dataset": {"extra": {"_target_": "vae_cli.data.shapes.shapes"}}})
    # every option of the config tree is registered, and checkpoints written before the
    # objective/ package name theirs by the old module path
    assert locate("divergence", "vae_cli.divergences.KL") is locate(
        "divergence", "vae_cli.objective.divergences.KL")
    assert "vae_cli.data.shapes.shapes" in registry()["dataset"]


def test_optimizer_is_any_torch_optim_class_from_one_yaml(compose_cfg):
    import torch

    params = [torch.nn.Parameter(torch.zeros(3))]
    for option, cls in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                        ("sgd", torch.optim.SGD)]:
        cfg = validate(compose_cfg([f"optim={option}", "optim.lr=0.5"]))
        opt = build_optimizer(cfg.optim, params)
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.5
    sgd = build_optimizer(validate(compose_cfg(["optim=sgd"])).optim, params)
    assert sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(UserError, match="optim"):  # torch's own range check, one line
        build_optimizer(validate(compose_cfg(["optim=sgd", "optim.momentum=-1"])).optim,
                        params)


@pytest.mark.parametrize("option", ["adam", "adam_normgrad", "adamw"])
def test_the_fused_update_is_the_same_optimizer_and_a_resume_keeps_its_own(compose_cfg,
                                                                             option):
    import torch

    from vae_cli.training.optimizers import load_optimizer

    cfg = validate(compose_cfg([f"optim={option}", "optim.weight_decay=0.01"])).optim
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(20)]
    runs = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = build_optimizer(cfg, params, compiled=not fused)
        assert bool(opt.param_groups[0].get("fused")) is fused  # this torch has CPU kernels
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        runs[fused] = (params, opt)
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    loop = build_optimizer(cfg, runs[False][0], compiled=True)  # a compiled resume
    load_optimizer(loop, runs[True][1].state_dict())
    assert not loop.param_groups[0].get("fused") and loop.state[runs[False][0][0]]
    sgd = validate(compose_cfg(["optim=sgd"])).optim  # fused where torch has it, else not
    assert type(build_optimizer(sgd, runs[False][0], compiled=False)) is torch.optim.SGD


def test_impossible_analytic_estimator_is_refused():
    from vae_cli.objective import rules
    from vae_cli.objective.divergences import KL
    from vae_cli.objective.priors import Prior
    from vae_cli.objective.rules import Design

    class Odd(Prior):  # a mixture: no closed-form KL from a Gaussian
        def dist(self):
            import torch
            from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
            comp = Independent(Normal(torch.randn(3, 2), torch.ones(3, 2)), 1)
            return MixtureSameFamily(Categorical(logits=torch.zeros(3)), comp)

    with pytest.raises(UserError, match="estimator=mc"):
        rules.check(Design(prior=Odd(2), divergence=KL(estimator="analytic")))
    kl = KL(estimator="auto")
    kl.bind(Odd(2))
    assert kl._analytic is False


def test_trainer_eval_and_sample_yaml_match_their_schemas(compose_cfg):
    import dataclasses

    from vae_cli.config.schemas import EvalCommand, EvalConfig, SampleCommand, TrainerConfig

    def keys(schema):
        return {f.name for f in dataclasses.fields(schema)}

    assert set(compose_cfg().trainer) == keys(TrainerConfig)
    ev = compose_cfg(name="eval")
    assert set(ev) == keys(EvalCommand) and set(ev.eval) == keys(EvalConfig)
    assert set(compose_cfg(name="sample")) == keys(SampleCommand)


def test_configs_saved_before_the_objective_package_still_build(compose_cfg):
    # Checkpoints written by earlier versions name divergences/priors/likelihoods/schedules
    # by their old module and the optimizer by optim.name.
    from omegaconf import OmegaConf

    from vae_cli.config.registry import upgrade

    saved = OmegaConf.to_container(compose_cfg(["optim=adamw"]), resolve=True)
    for group in ("divergence", "prior", "loss", "schedule"):
        saved[group]["_target_"] = saved[group]["_target_"].replace("vae_cli.objective.",
                                                                    "vae_cli.")
    saved["optim"] = {"name": "adamw", **{k: v for k, v in saved["optim"].items()
                                          if k != "_target_"}}
    cfg = validate(OmegaConf.create(upgrade(saved)))
    assert cfg.optim._target_ == "torch.optim.AdamW"
    objective = build_objective(cfg, (1, 8, 8), 10)
    assert type(objective.divergence).__name__ == "KL"
    with pytest.raises(UserError, match="optim"):
        validate(OmegaConf.create(upgrade({**saved, "optim": {"name": "lbfgs2"}})))


@pytest.mark.parametrize("board, tracker", [(False, "Tracker"), (True, "TensorBoard"),
                                            (None, "Tracker")])
def test_configs_saved_before_the_logger_group_still_load(compose_cfg, board, tracker):
    # Checkpoints written before logger= had trainer.tensorboard (true: logger=tensorboard)
    # and no logger group; eval, sample and a resume read them through upgrade().
    from omegaconf import OmegaConf

    from vae_cli.config.registry import upgrade

    saved = OmegaConf.to_container(compose_cfg(), resolve=True)
    del saved["logger"]
    if board is not None:
        saved["trainer"]["tensorboard"] = board
    cfg = validate(OmegaConf.create(upgrade(saved)))
    assert cfg.logger._target_ == f"vae_cli.reports.trackers.{tracker}"
    assert "tensorboard" not in cfg.trainer
    with pytest.raises(UserError, match="no 'logger' group"):  # only upgrade() adds it
        validate(OmegaConf.create(saved))
