"""Start-up validation: wrong types and impossible values fail with one clear line."""

import pytest

from vae_cli.config.build import build_model
from vae_cli.config.components import check_targets, locate, validate
from vae_cli.errors import UserError


def test_default_config_validates_and_builds(compose_cfg):
    cfg = validate(compose_cfg())
    assert cfg.trainer.device == "auto"
    model = build_model(cfg, (1, 32, 32), 100)
    assert model.latent_dim == cfg.model.latent_dim


@pytest.mark.parametrize("override", [
    "model=conv", "loss=gaussian", "optim=adamw", "divergence.beta=4", "model.latent_dim=3",
    "trainer.device=cpu", "trainer.patience=3", "divergence.estimator=mc",
    "model.activation=gated",
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
    (["optim.name=sgdx"], "optim.name"),
    (["divergence.beta=high"], "divergence.beta"),
    (["+model.depth=3"], "model.depth"),
    (["+dataset.colour=1"], "dataset.colour"),
    (["seed=x"], "seed"),
    (["trainer.patience=0"], "trainer.patience"),
    (["model.hidden=5"], "model.hidden"),
])
def test_bad_values_fail_with_the_key_named(compose_cfg, overrides, fragment):
    with pytest.raises(UserError) as e:
        validate(compose_cfg(overrides))
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_targets_outside_the_package_are_refused():
    with pytest.raises(UserError, match="outside vae_cli"):
        locate("os.system")
    with pytest.raises(UserError, match="outside vae_cli"):
        check_targets({"model": {"_target_": "builtins.eval"}})
    with pytest.raises(UserError, match="outside vae_cli"):
        check_targets({"a": [{"b": {"_target_": "subprocess.call"}}]})


def test_impossible_analytic_estimator_is_refused():
    from vae_cli.objective.divergences import KL
    from vae_cli.objective.priors import Prior

    class Odd(Prior):  # a mixture: no closed-form KL from a Gaussian
        def dist(self):
            import torch
            from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
            comp = Independent(Normal(torch.randn(3, 2), torch.ones(3, 2)), 1)
            return MixtureSameFamily(Categorical(logits=torch.zeros(3)), comp)

    with pytest.raises(UserError, match="estimator=mc"):
        KL(estimator="analytic").check(Odd(2))
    kl = KL(estimator="auto")
    kl.check(Odd(2))
    assert kl._analytic is False


def test_trainer_and_optim_yaml_match_their_schemas(compose_cfg):
    import dataclasses

    from vae_cli.config.components import OptimConfig, TrainerConfig

    for name in ("adam", "adamw"):
        cfg = compose_cfg([f"optim={name}"])
        assert set(cfg.optim) == {f.name for f in dataclasses.fields(OptimConfig)}
    assert set(compose_cfg().trainer) == {f.name for f in dataclasses.fields(TrainerConfig)}
