"""Posterior families: flow log-determinants against autograd Jacobians, a flow's density
normalises, IAF steps are autoregressive, and what flows cannot do is refused."""

from __future__ import annotations

import math

import pytest
import torch

from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.objective.posteriors import (
    IAF,
    MADE,
    DiagonalGaussian,
    Planar,
    PushedGaussian,
    Radial,
    base_of,
    iaf_step,
    mean_of,
)

D = 3


def _families(d=D):
    torch.manual_seed(0)
    return [Planar(steps=3), Radial(steps=3), IAF(steps=3, context=4, hidden=16, latent_dim=d)]


def _q(family, batch=1, spread=1.0, d=D):
    h = spread * torch.randn(batch, family.outputs(d))
    if isinstance(family, IAF):  # random MADE outputs, not the identity they start as
        for made in family.made:
            torch.nn.init.normal_(made.out.weight, std=0.5)
    return family(h)


@pytest.mark.parametrize("family", _families(), ids=lambda f: type(f).__name__)
def test_each_steps_log_det_is_that_of_its_autograd_jacobian(family):
    q = _q(family)
    z = torch.randn(1, D)
    for step in q.steps:
        jac = torch.autograd.functional.jacobian(lambda v, s=step: s(v)[0], z)[0, :, 0, :]
        _, log_det = step(z)
        assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-4)
        z = step(z)[0]


@pytest.mark.parametrize("family", _families(2), ids=lambda f: type(f).__name__)
def test_a_flow_density_normalises(family):
    """E_q[g(z) / q(z)] = integral of g = 1 for a normalised g inside q's bulk (a narrow
    Gaussian at q's mean point, so the ratio stays bounded): a wrong sign or a missing
    log-determinant moves it far from 1."""
    torch.manual_seed(1)
    q = _q(family, spread=0.7, d=2)
    centre = mean_of(q)
    z = q.rsample((60000,))  # [n, 1, 2]
    g = torch.distributions.Normal(centre, 0.3).log_prob(z).sum(-1)
    ratio = torch.exp(g - q.log_prob(z)).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.08)


def test_iaf_steps_are_autoregressive():
    torch.manual_seed(2)
    made = MADE(4, 12, 3)
    torch.nn.init.normal_(made.out.weight)
    h = torch.randn(1, 3)
    for reverse in (False, True):
        jac = torch.autograd.functional.jacobian(
            lambda v, r=reverse: iaf_step(v, h, made, r)[0], torch.randn(1, 4))[0, :, 0, :]
        jac = jac.flip(0, 1) if reverse else jac  # a reversed step is triangular the other way
        assert torch.count_nonzero(jac.triu(1)) == 0 and torch.count_nonzero(jac.tril(-1)) > 0


def test_planar_steps_stay_invertible():
    torch.manual_seed(3)
    q = Planar(steps=1)(torch.randn(500, Planar(steps=1).outputs(D)) * 3)
    z = torch.randn(500, D)
    _, log_det = q.steps[0](z)
    assert torch.isfinite(log_det).all()
    # the constrained u' satisfies w.u' >= -1: det = 1 + (1 - tanh^2) w.u' stays > 0
    u = q.steps[0].__defaults__[0]
    w = q.steps[0].__defaults__[1]
    assert ((w * u).sum(-1) >= -1 - 1e-5).all()


def test_a_flow_knows_its_density_at_its_own_samples_only():
    q = _q(Planar(steps=2), batch=4)
    z = q.rsample()
    assert q.log_prob(z).shape == (4,)
    with pytest.raises(ValueError, match="known only at the sample"):
        q.log_prob(z.clone())
    assert mean_of(q).shape == (4, D) and base_of(q).loc.shape == (4, D)
    with pytest.raises(ValueError):  # the mean is no sample: no density claim about it
        q.log_prob(mean_of(q))


def test_gaussian_is_todays_posterior_and_bounds_its_logvar():
    h = torch.tensor([[0.5, -100.0]])
    q = DiagonalGaussian(logvar_min=-6.0, logvar_max=2.0)(h)
    assert q.base_dist.loc.item() == 0.5 and q.base_dist.scale.item() == pytest.approx(
        math.exp(-3.0))
    with pytest.raises(UserError, match="logvar_min"):
        DiagonalGaussian(logvar_min=3.0, logvar_max=2.0)


@pytest.mark.parametrize("overrides, fragment", [
    (["posterior=iaf", "prior=vamp"], "prior=vamp is a mixture of posteriors"),
    (["posterior=planar", "divergence=tc"], "divergence=tc needs q"),
    (["posterior=radial", "divergence.free_bits=0.5"], "no closed-form or per-dimension KL"),
    (["posterior=radial", "divergence.estimator=analytic"], "no closed-form"),
])
def test_what_flows_cannot_do_is_refused_in_one_line(compose_cfg, overrides, fragment):
    cfg = validate_train(compose_cfg(["model.hidden=[8]", "model.latent_dim=2", *overrides]))
    with pytest.raises(UserError, match=fragment):
        build_objective(cfg, (1, 8, 8), 100)


@pytest.mark.parametrize("posterior", ["planar", "radial", "iaf"])
def test_flows_train_on_the_elbo_and_the_iwae_bound(compose_cfg, posterior):
    torch.manual_seed(4)
    cfg = validate_train(compose_cfg(["model.hidden=[16]", "model.latent_dim=3",
                                      f"posterior={posterior}", "trainer.iw_samples=4"]))
    objective = build_objective(cfg, (1, 8, 8), 100)
    x = (torch.rand(6, 1, 8, 8) > 0.5).float()
    assert isinstance(objective.model.posterior(x), PushedGaussian)
    for iw in (4, 1):
        objective.iw_samples = iw
        terms, _ = objective(x, step=0)
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"])
        family, head = objective.model.family, objective.model.encoder[-1]
        # the flow takes part: its amortised parameters (an IAF: its MADEs) get gradients
        flow = family.made[0].out.weight if posterior == "iaf" else head.weight[6:]
        assert flow.grad is not None if posterior == "iaf" else True
        grad = flow.grad if posterior == "iaf" else head.weight.grad[6:]
        assert grad.abs().sum() > 0
        objective.zero_grad()
