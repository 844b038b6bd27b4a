"""The objective's terms against closed forms and independent estimates."""

import math

import pytest
import torch
from torch.distributions import Bernoulli as TBernoulli
from torch.distributions import Independent, Normal

from vae_cli.errors import UserError
from vae_cli.evaluation.units import bits_per_dim
from vae_cli.objective.divergences import KL
from vae_cli.objective.likelihoods import Bernoulli, Gaussian
from vae_cli.objective.priors import NormalPrior


def _posterior(b=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, d, generator=g)
    std = torch.rand(b, d, generator=g) * 1.5 + 0.2
    return Independent(Normal(mu, std), 1)


def test_analytic_kl_matches_closed_form():
    q = _posterior()
    mu, var = q.mean, q.variance
    closed = 0.5 * (mu.pow(2) + var - 1 - var.log()).sum(1).mean()
    kl = KL(estimator="analytic")
    prior = NormalPrior(latent_dim=5)
    kl.bind(prior)
    out = kl(q, q.rsample(), prior)["div"]
    assert torch.allclose(out, closed, atol=1e-5)


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = _posterior(b=8)
    prior = NormalPrior(latent_dim=5)
    analytic, mc = KL(estimator="analytic"), KL(estimator="mc")
    analytic.bind(prior), mc.bind(prior)
    z = q.rsample((20000,))  # [S, B, D]: MC average over S per example
    mc_value = (q.log_prob(z) - prior.log_prob(z)).mean(0).mean()
    exact = analytic(q, z[0], prior)["div"]
    assert mc_value.item() == pytest.approx(exact.item(), rel=0.02)
    # the estimator itself averages log q - log p at the given z
    single = mc(q, z[0], prior)["div"]
    assert torch.allclose(single, (q.log_prob(z[0]) - prior.log_prob(z[0])).mean())


def test_kl_is_zero_for_posterior_equal_to_prior():
    q = Independent(Normal(torch.zeros(4, 3), torch.ones(4, 3)), 1)
    kl = KL()
    kl.bind(NormalPrior(latent_dim=3))
    assert kl(q, q.rsample(), NormalPrior(latent_dim=3))["div"].abs().item() < 1e-6


def test_kl_options_are_checked():
    with pytest.raises(UserError, match="estimator"):
        KL(estimator="exact")
    with pytest.raises(UserError, match="beta"):
        KL(beta=-1.0)


def test_bernoulli_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 1, 4, 4, generator=g) * 3
    x = torch.bernoulli(torch.rand(6, 1, 4, 4, generator=g))
    expected = -TBernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(Bernoulli().nll(logits, x), expected, atol=1e-4)


def test_bernoulli_is_stable_for_large_logits():
    logits = torch.tensor([[[[80.0, -80.0]]]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    assert torch.isfinite(Bernoulli().nll(logits, x)).all()
    assert Bernoulli().nll(logits, x).item() < 1e-6


@pytest.mark.parametrize("sigma", [0.05, 0.1, 1.0])
def test_gaussian_nll_matches_torch_distributions(sigma):
    g = torch.Generator().manual_seed(2)
    mean = torch.rand(5, 3, 8, 8, generator=g)
    x = torch.rand(5, 3, 8, 8, generator=g)
    expected = -Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(Gaussian(sigma=sigma).nll(mean, x), expected, rtol=1e-5)


def test_gaussian_sigma_must_be_positive():
    with pytest.raises(UserError, match="sigma"):
        Gaussian(sigma=0.0)


def test_likelihoods_compute_in_float32_under_bf16_outputs():
    out = torch.randn(2, 1, 4, 4).to(torch.bfloat16)
    x = torch.rand(2, 1, 4, 4)
    assert Bernoulli().nll(out, x).dtype == torch.float32
    assert Gaussian().nll(out, x).dtype == torch.float32


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_normal_prior_sample_and_log_prob():
    p = NormalPrior(latent_dim=4)
    z = p.sample(10)
    assert z.shape == (10, 4)
    expected = Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(p.log_prob(z), expected)


@pytest.mark.parametrize("name", ["Bernoulli", "Gaussian", "Laplace", "Categorical",
                                  "DiscretizedLogistic"])
def test_nll_broadcasts_over_leading_samples(name):
    """IWAE decodes k samples and lets x broadcast: each slice must equal the plain call."""
    import vae_cli.objective.likelihoods as L

    lik = getattr(L, name)()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 2, 4, 4), generator=g).float() / 255
    out = torch.randn(5, 3, 2 * lik.out_mult, 4, 4, generator=g)
    batched = lik.nll(out, x)
    assert batched.shape == (5, 3)
    for i in range(5):
        assert torch.allclose(batched[i], lik.nll(out[i], x), atol=1e-4)
