"""Priors p(z): shapes, log-densities against hand-written formulas, gradients, errors."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from vae_cli.errors import UserError
from vae_cli.objective.priors import LearnedPrior, MixturePrior, NormalPrior, VampPrior

SHAPE = (1, 3, 3)  # tiny data space for the VampPrior's pseudo-inputs
D = 3


def _normal_logpdf(z, loc, std):
    """log N(z; loc, std^2) per coordinate, written out rather than via torch.distributions."""
    return -0.5 * ((z - loc) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


class _LinearEncoder:
    """posterior(x) = Independent(Normal(x W_mu + b_mu, exp(0.5 (x W_v + b_v))), 1)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        n_in = math.prod(SHAPE)
        self.w_mu = torch.randn(n_in, D, generator=g)
        self.b_mu = torch.randn(D, generator=g)
        self.w_v = 0.3 * torch.randn(n_in, D, generator=g)
        self.b_v = 0.3 * torch.randn(D, generator=g)

    def moments(self, x):
        flat = x.flatten(1)
        return flat @ self.w_mu + self.b_mu, torch.exp(0.5 * (flat @ self.w_v + self.b_v))

    def __call__(self, x):
        mu, std = self.moments(x)
        return Independent(Normal(mu, std), 1)


def _vamp(components=5, encoder=None):
    prior = VampPrior(components=components, latent_dim=D, shape=SHAPE)
    prior.bind(encoder or _LinearEncoder())
    return prior


def _randomised(prior, seed=1):
    """Move every parameter off its initial value so the test does not pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return prior


PRIORS = {
    "normal": lambda: NormalPrior(latent_dim=D),
    "learned": lambda: LearnedPrior(latent_dim=D),
    "mixture": lambda: MixturePrior(components=4, latent_dim=D),
    "vamp": lambda: _vamp(),
}


@pytest.mark.parametrize("name", PRIORS)
def test_sample_shape_and_log_prob_shape(name):
    torch.manual_seed(0)
    prior = PRIORS[name]()
    z = prior.sample(7)
    assert z.shape == (7, D)
    assert torch.isfinite(z).all()
    assert prior.log_prob(z).shape == (7,)


def test_learned_prior_log_prob_matches_hand_formula():
    prior = _randomised(LearnedPrior(latent_dim=D))
    z = torch.randn(11, D, generator=torch.Generator().manual_seed(2))
    std = torch.exp(0.5 * prior.logvar)
    expected = _normal_logpdf(z, prior.loc, std).sum(1)
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-5)


def test_learned_prior_starts_as_standard_normal():
    z = torch.randn(5, D, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(LearnedPrior(latent_dim=D).log_prob(z),
                          NormalPrior(latent_dim=D).log_prob(z))


def test_mixture_log_prob_is_logsumexp_over_weighted_components():
    prior = _randomised(MixturePrior(components=4, latent_dim=D))
    z = 2 * torch.randn(9, D, generator=torch.Generator().manual_seed(4))
    log_w = torch.log_softmax(prior.logits, 0)  # [K]
    std = torch.exp(0.5 * prior.logvar)  # [K, D]
    per_comp = _normal_logpdf(z[:, None, :], prior.loc[None], std[None]).sum(2)  # [N, K]
    expected = torch.logsumexp(per_comp + log_w, dim=1)
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-5)


def test_mixture_samples_have_the_mixture_mean():
    # Independent check of sample(): E[z] = sum_k w_k mu_k; the standard error with 40k
    # draws and unit-ish variances is ~0.01, the tolerance 0.05.
    prior = _randomised(MixturePrior(components=3, init_spread=3.0, latent_dim=D))
    torch.manual_seed(5)
    z = prior.sample(40000)
    w = torch.softmax(prior.logits, 0)[:, None].detach()
    assert torch.allclose(z.mean(0), (w * prior.loc).sum(0).detach(), atol=0.05)
    # second moment sum_k w_k (mu_k^2 + sigma_k^2): catches a wrong scale or component pick
    second = (w * (prior.loc**2 + prior.logvar.exp())).sum(0).detach()
    assert torch.allclose(z.pow(2).mean(0), second, rtol=0.05)


def test_vamp_log_prob_is_mean_of_posteriors_at_pseudo_inputs():
    enc = _LinearEncoder()
    prior = _randomised(_vamp(components=5, encoder=enc))
    z = torch.randn(6, D, generator=torch.Generator().manual_seed(6))
    u = prior.pseudo.detach().clamp(0, 1)  # the hardtanh, written independently
    mu, std = enc.moments(u)  # [K, D] each
    per_comp = _normal_logpdf(z[:, None, :], mu[None], std[None]).sum(2)  # [N, K]
    expected = torch.logsumexp(per_comp, dim=1) - math.log(5)
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-4)


def test_vamp_pseudo_inputs_stay_in_unit_interval():
    prior = _vamp(components=4)
    with torch.no_grad():
        prior.pseudo.copy_(torch.linspace(-2, 3, prior.pseudo.numel()).view_as(prior.pseudo))
    u = prior.pseudo_inputs()
    assert u.min().item() == 0.0 and u.max().item() == 1.0
    # ... and the inside of the interval passes through unchanged
    inside = (prior.pseudo > 0) & (prior.pseudo < 1)
    assert inside.any() and torch.equal(u[inside], prior.pseudo[inside])


def test_vamp_pseudo_inputs_start_inside_unit_interval():
    prior = VampPrior(components=50, latent_dim=D, shape=SHAPE)
    assert (prior.pseudo > 0).all() and (prior.pseudo < 1).all()


def test_vamp_before_bind_raises():
    prior = VampPrior(components=3, latent_dim=D, shape=SHAPE)
    with pytest.raises((RuntimeError, UserError), match="bind"):
        prior.log_prob(torch.zeros(2, D))


@pytest.mark.parametrize("name", ["learned", "mixture", "vamp"])
def test_learned_priors_get_gradients_from_log_prob(name):
    torch.manual_seed(7)
    prior = PRIORS[name]()
    params = dict(prior.named_parameters())
    assert params, "a learned prior must expose trainable parameters"
    z = torch.randn(16, D, generator=torch.Generator().manual_seed(8))
    prior.log_prob(z).sum().backward()
    for pname, p in params.items():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["mixture", "vamp"])
def test_mixture_samples_carry_gradients_to_components_but_not_weights(name):
    # Documented in Prior.sample: the component index is drawn, the component rsampled.
    torch.manual_seed(11)
    prior = PRIORS[name]()
    prior.sample(64).pow(2).sum().backward()
    grads = {n: p.grad for n, p in prior.named_parameters()}
    for pname in ("loc", "logvar") if name == "mixture" else ("pseudo",):
        assert grads[pname] is not None and grads[pname].abs().sum() > 0, pname
    if name == "mixture":
        assert grads["logits"] is None or grads["logits"].abs().sum() == 0


def test_normal_prior_has_nothing_to_train():
    assert list(NormalPrior(latent_dim=D).parameters()) == []


def test_learned_prior_samples_are_reparameterised():
    # rsample: gradients of a sample-based divergence reach the prior's parameters.
    prior = LearnedPrior(latent_dim=D)
    torch.manual_seed(9)
    prior.sample(8).pow(2).sum().backward()
    assert prior.loc.grad is not None and prior.loc.grad.abs().sum() > 0


@pytest.mark.parametrize("components", [0, -1])
def test_components_must_be_positive(components):
    with pytest.raises(UserError, match="components"):
        MixturePrior(components=components, latent_dim=D)
    with pytest.raises(UserError, match="components"):
        VampPrior(components=components, latent_dim=D, shape=SHAPE)


def test_prior_init_does_not_consume_the_global_rng():
    # Building a prior must not shift the training run's random stream.
    torch.manual_seed(10)
    expected = torch.rand(3)
    torch.manual_seed(10)
    MixturePrior(components=5, latent_dim=D)
    VampPrior(components=5, latent_dim=D, shape=SHAPE)
    assert torch.equal(torch.rand(3), expected)


def test_a_temperature_scales_every_gaussians_standard_deviation():
    # independent estimate: 40k draws, std of the std estimate ~0.4%; tolerance 3%
    learned = _randomised(LearnedPrior(latent_dim=D))
    torch.manual_seed(3)
    z = learned.sample(40000, temperature=0.5).detach()
    torch.testing.assert_close(z.std(0), 0.5 * (0.5 * learned.logvar).exp().detach(), rtol=0.03,
                               atol=0)
    assert torch.equal(learned.sample(4, temperature=0.0), learned.loc.expand(4, D))
    mog = _randomised(MixturePrior(components=3, init_spread=3.0, latent_dim=D))
    at_means = mog.sample(50, temperature=0.0).detach()  # each draw is one component's mean
    assert all(any(torch.equal(z, mu) for mu in mog.loc.detach()) for z in at_means)
    z = mog.sample(40000, temperature=0.5).detach()
    w = torch.softmax(mog.logits, 0)[:, None].detach()
    second = (w * (mog.loc**2 + 0.25 * mog.logvar.exp())).sum(0).detach()
    torch.testing.assert_close(z.pow(2).mean(0), second, rtol=0.05, atol=0)


def test_a_prior_without_gaussians_has_no_temperature():
    prior = NormalPrior(latent_dim=D)
    prior.dist = lambda: torch.distributions.Independent(  # a prior that is not Gaussian
        torch.distributions.Laplace(torch.zeros(D), torch.ones(D)), 1)
    with pytest.raises(UserError, match="temperature=0.5 scales a Gaussian prior's standard"):
        prior.sample(3, temperature=0.5)
