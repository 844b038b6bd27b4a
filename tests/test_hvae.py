"""model=hvae: the two-level posterior and prior against independent computations, the
IWAE bound, VampPrior on the top layer, refusals, and a tiny run with its pictures."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.objective.bounds import log_weights
from vae_cli.objective.hierarchy import TwoLevelPosterior, TwoLevelPrior
from vae_cli.objective.posteriors import mean_of
from vae_cli.objective.priors import VampPrior

SMALL = ["model=hvae", "model.hidden=16", "model.latent_dim=3", "model.top_dim=2"]


def _objective(compose, *extra):
    torch.manual_seed(0)
    return build_objective(validate_train(compose([*SMALL, *extra])), (1, 6, 6), 100)


def _normal(params):
    mu, logvar = params.chunk(2, dim=-1)
    return Normal(mu, torch.exp(0.5 * logvar.clamp(-30, 20)))


def test_log_q_is_that_of_both_layers_at_the_drawn_sample(compose_cfg):
    model = _objective(compose_cfg).model
    x = torch.rand(5, 1, 6, 6)
    q = model.posterior(x)
    assert isinstance(q, TwoLevelPosterior)
    z = model.rsample(q, k=4)  # [4, 5, 3 + 2]
    z1, z2 = z[..., :3], z[..., 3:]
    h = model.encoder(x)
    top = _normal(h[:, :4])
    hier = model.family.hierarchy
    lower = _normal(hier.posterior_z1(h[:, 4:], z2))
    expected = top.log_prob(z2).sum(-1) + lower.log_prob(z1).sum(-1)
    torch.testing.assert_close(q.log_prob(z), expected)
    assert mean_of(q).shape == (5, 5)


def test_log_p_is_the_top_prior_times_p_z1_given_z2(compose_cfg):
    prior = _objective(compose_cfg).model.prior
    assert isinstance(prior, TwoLevelPrior) and prior.latent_dim == 5
    z = prior.sample(7)
    z1, z2 = z[:, :3], z[:, 3:]
    expected = Normal(0.0, 1.0).log_prob(z2).sum(-1) + _normal(
        prior.hierarchy.prior_z1(z2)).log_prob(z1).sum(-1)
    torch.testing.assert_close(prior.log_prob(z), expected)
    torch.testing.assert_close(prior.dist().log_prob(z), expected)
    settled = prior.settle(z)  # a moved top layer decodes with z1 at p(z1|z2)'s mean
    assert torch.equal(settled[:, 3:], z2)
    torch.testing.assert_close(settled[:, :3], prior.hierarchy.prior_z1(z2)[:, :3])
    assert prior.top_dims == [3, 4]


def test_the_iwae_bound_tightens_the_elbo_and_trains(compose_cfg):
    objective = _objective(compose_cfg, "trainer.iw_samples=8")
    x = (torch.rand(6, 1, 6, 6) > 0.5).float()
    torch.manual_seed(1)
    lw = log_weights(objective.model, x, 2000)
    elbo = lw.total().mean(0)
    iwae = torch.logsumexp(lw.total(), 0) - torch.log(torch.tensor(2000.0))
    assert (iwae >= elbo).all()
    terms, _ = objective(x, step=0)
    terms["loss"].backward()
    grads = [p.grad for p in objective.model.family.hierarchy.q_joint.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_vampprior_sits_on_the_top_layer(compose_cfg):
    objective = _objective(compose_cfg, "prior=vamp", "prior.components=4")
    top = objective.model.prior.top
    assert isinstance(top, VampPrior) and top.latent_dim == 2
    assert top.dist().component_distribution.base_dist.loc.shape == (4, 2)
    x = torch.rand(3, 1, 6, 6)
    terms, _ = objective(x, step=0)
    terms["loss"].backward()
    assert top.pseudo.grad is not None and top.pseudo.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides, fragment", [
    (["posterior=planar"], "model=hvae has Gaussian layers"),
    (["divergence=tc"], "divergence=tc needs q"),
    (["model.conditional=true"], "no conditional form"),
])
def test_what_hvae_cannot_do_is_refused_in_one_line(compose_cfg, overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        build_objective(validate_train(compose_cfg([*SMALL, *overrides])), (1, 6, 6), 100,
                        num_classes=3)


def test_a_temperature_tempers_both_layers(compose_cfg):
    prior = _objective(compose_cfg).model.prior
    z = prior.sample(6, temperature=0.0)  # z2 at the top prior's mean, z1 at p(z1|z2)'s
    assert torch.equal(z[:, 3:], torch.zeros(6, 2))
    torch.testing.assert_close(z[:, :3], _normal(prior.hierarchy.prior_z1(z[:, 3:])).mean)
    torch.manual_seed(0)
    z = prior.sample(20000, temperature=0.5)
    torch.testing.assert_close(z[:, 3:].std(0), torch.full((2,), 0.5), rtol=0.03, atol=0)
    lower = _normal(prior.hierarchy.prior_z1(z[:, 3:]))
    residual = (z[:, :3] - lower.mean) / lower.stddev  # ~N(0, 0.25) given z2
    torch.testing.assert_close(residual.std(0), torch.full((3,), 0.5), rtol=0.03, atol=0)


def test_the_bounds_frozen_density_is_the_two_level_log_prob(compose_cfg):
    # vae eval scores z under p(z) computed once: the VampPrior over z2 by matrix products
    prior = _objective(compose_cfg, "prior=vamp", "prior.components=7").model.prior
    torch.manual_seed(1)
    z = 2 * torch.randn(3, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(prior.frozen_log_prob()(z), prior.log_prob(z), rtol=1e-5,
                                   atol=1e-4)
