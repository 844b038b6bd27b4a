"""The importance-weighted bound (Burda et al. 2016): Objective.iwae and bounds.log_weights,
and the settings it cannot honour, refused."""

import math

import pytest
import torch
from torch.distributions import kl_divergence

from vae_cli.errors import UserError
from vae_cli.nets import mlp
from vae_cli.objective import rules
from vae_cli.objective.bounds import Objective, log_weights
from vae_cli.objective.divergences import KL, TotalCorrelation
from vae_cli.objective.likelihoods import Bernoulli
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import DiagonalGaussian
from vae_cli.objective.priors import NormalPrior
from vae_cli.objective.rules import Design
from vae_cli.objective.schedules import Capacity, Constant, Linear

LATENT, SHAPE, B = 3, (1, 4, 4), 8


def _model(seed=0, sharpen=4.0, **kw):
    """A random MLP VAE whose decoder is scaled up: a peaked likelihood makes the posterior
    a poor proposal, so the bounds for k = 1, 5, 50 are nats apart instead of hundredths."""
    torch.manual_seed(seed)
    nets = mlp.build(latent_dim=LATENT, shape=SHAPE, hidden=[32])
    with torch.no_grad():
        for p in nets.decoder.parameters():
            p.mul_(sharpen)
    model = VAE(nets, DiagonalGaussian(), NormalPrior(latent_dim=LATENT), Bernoulli(), LATENT)
    return Objective(model, KL(**kw))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((B, *SHAPE), 0.5), generator=g)


@pytest.mark.parametrize("k", [1, 7])
def test_log_weights_shapes_and_values(k):
    model, x = _model().model, _data()
    torch.manual_seed(2)
    log_px, log_pz, log_qz = log_weights(model, x, k)
    assert log_px.shape == log_pz.shape == log_qz.shape == (k, B)
    # the same draws, scored one sample at a time
    torch.manual_seed(2)
    q = model.posterior(x)
    z = q.rsample((k,))
    for s in range(k):
        assert torch.allclose(log_px[s], -Bernoulli().nll(model.decode(z[s]), x), atol=1e-4)
        assert torch.allclose(log_pz[s], model.prior.log_prob(z[s]), atol=1e-5)
        assert torch.allclose(log_qz[s], q.log_prob(z[s]), atol=1e-5)


def test_iwae_with_one_sample_is_the_single_sample_elbo():
    # Same seed => same z: -loss of iwae(k=1) is recon + MC KL at that z, to float tolerance.
    objective, x = _model(estimator="mc"), _data()
    torch.manual_seed(3)
    elbo_loss = objective(x)[0]["loss"]
    torch.manual_seed(3)
    iw, _ = objective.iwae(x, 1)
    assert torch.allclose(iw["loss"], elbo_loss, atol=1e-4)


def _bounds(model, x, k, repeats, seed):
    """Per-repeat batch means of the k-sample bound, from one big batched call."""
    torch.manual_seed(seed)
    with torch.no_grad():
        log_px, log_pz, log_qz = log_weights(model, x.repeat(repeats, 1, 1, 1), k)
    bound = torch.logsumexp(log_px + log_pz - log_qz, dim=0) - math.log(k)
    return bound.view(repeats, B).mean(1)


def test_iwae_with_one_sample_equals_the_analytic_elbo_in_expectation():
    model, x = _model().model, _data()
    iw1 = _bounds(model, x, 1, 1000, seed=4)
    # ELBO with the closed-form KL, on draws independent of the ones above
    torch.manual_seed(5)
    with torch.no_grad():
        xr = x.repeat(1000, 1, 1, 1)
        q = model.posterior(xr)
        elbo = -Bernoulli().nll(model.decode(q.rsample()), xr) - kl_divergence(
            q, model.prior.dist())
        elbo = elbo.view(1000, B).mean(1)
    se = math.sqrt((iw1.var() + elbo.var()).item() / 1000)
    assert abs(iw1.mean().item() - elbo.mean().item()) < 4 * se
    assert se < 0.3  # the check above is not vacuous


def test_iwae_bound_tightens_with_k():
    model, x = _model().model, _data()
    means, ses = {}, {}
    for k in (1, 5, 50):
        b = _bounds(model, x, k, 500, seed=6 + k)
        means[k], ses[k] = b.mean().item(), b.std().item() / math.sqrt(500)
    for lo, hi in ((1, 5), (5, 50)):
        tol = 4 * math.hypot(ses[lo], ses[hi])
        assert means[hi] >= means[lo] - tol  # weakly increasing, within MC noise
    # and here, with a poor proposal, strictly: several nats between k = 1 and k = 50
    assert means[50] > means[1] + 2.0


def test_iwae_loss_uses_the_scheduled_weight_inside_each_importance_weight():
    objective, x = _model(beta=2.0), _data()
    objective.schedule = Linear(warmup_steps=10)
    torch.manual_seed(8)
    out, _ = objective.iwae(x, 6, step=5)  # weight 2.0 * 0.5 = 1.0 on log p(z) - log q(z|x)
    torch.manual_seed(8)
    log_px, log_pz, log_qz = log_weights(objective.model, x, 6)
    bound = torch.logsumexp(log_px + 1.0 * (log_pz - log_qz), dim=0) - math.log(6)
    assert torch.allclose(out["loss"], -bound.mean(), atol=1e-4)
    assert torch.allclose(out["recon"], -log_px.mean(), atol=1e-4)
    assert torch.allclose(out["div"], (log_qz - log_pz).mean(), atol=1e-5)


def test_training_with_iw_samples_gives_a_finite_loss_with_gradients():
    torch.manual_seed(9)
    nets = mlp.build(latent_dim=LATENT, shape=SHAPE, hidden=[16])
    model = Objective(VAE(nets, DiagonalGaussian(), NormalPrior(latent_dim=LATENT), Bernoulli(),
                          LATENT), KL(),
                      iw_samples=5)
    x = _data()
    torch.manual_seed(10)
    out, _ = model(x)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    out["loss"].backward()
    params = model.main_parameters()
    assert params
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(p.grad.abs().sum() for p in params) > 0
    # forward dispatches to the 5-sample bound
    torch.manual_seed(10)
    assert torch.allclose(model.iwae(x, 5)[0]["loss"], out["loss"])


def _with(divergence, schedule=None, iw_samples=4):
    """The objective, after the rules every built objective passes."""
    nets = mlp.build(latent_dim=LATENT, shape=SHAPE, hidden=[8])
    prior = NormalPrior(latent_dim=LATENT)
    rules.check(Design(DiagonalGaussian(), prior, divergence, schedule or Constant(),
                       iw_samples=iw_samples))
    model = VAE(nets, DiagonalGaussian(), prior, Bernoulli(), LATENT)
    return Objective(model, divergence, schedule, iw_samples)


@pytest.mark.parametrize("divergence, schedule, word", [
    (KL(), Capacity(c_max=5.0, steps=10, gamma=100.0), "schedule=capacity"),
    (TotalCorrelation(alpha=1.0, beta=6.0, gamma=1.0, dataset_size=100), None,
     "divergence=tc"),
    (KL(free_bits=0.5), None, "free_bits"),
])
def test_settings_the_iw_bound_cannot_honour_are_refused(divergence, schedule, word):
    # Each used to be dropped without a word when trainer.iw_samples > 1: the capacity
    # target and gamma, tc's alpha/beta/gamma, the free-bits floor. At k = 1 they compose.
    with pytest.raises(UserError, match=word) as e:
        _with(divergence, schedule)
    assert "\n" not in str(e.value)
    _with(divergence, schedule, iw_samples=1)(_data())


def test_the_bounds_mixture_density_is_the_mixtures_log_prob():
    """vae eval scores a mixture prior (VampPrior, mog) by matrix products in float64: the
    mixture's own density, to float32 rounding, also far from every component; any other
    prior keeps its log_prob."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    from vae_cli.objective.priors import fixed_density as density

    g = torch.Generator().manual_seed(3)
    k, d = 50, 6
    logits, loc = torch.randn(k, generator=g), 2 * torch.randn(k, d, generator=g)
    scale = torch.exp(0.5 * (8 * torch.rand(k, d, generator=g) - 6))  # logvar in [-6, 2]

    def mixture(dtype):
        return MixtureSameFamily(Categorical(logits=logits.to(dtype)),
                                 Independent(Normal(loc.to(dtype), scale.to(dtype)), 1))

    z = 3 * torch.randn(4, 30, d, generator=g)
    exact = mixture(torch.float64).log_prob(z.double())
    fast = density(mixture(torch.float32))(z)
    assert fast.shape == z.shape[:-1] and fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), exact, rtol=1e-6, atol=1e-4)
    normal = NormalPrior(latent_dim=d).dist()
    assert density(normal) == normal.log_prob
