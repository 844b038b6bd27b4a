"""Divergences against closed forms, hand-written estimators and independent estimates."""

import copy
import itertools
import math

import pytest
import torch
from test_priors import _randomised
from torch import nn
from torch.distributions import Independent, Normal

from vae_cli.errors import UserError
from vae_cli.nets import mlp
from vae_cli.objective import rules
from vae_cli.objective.auxiliary import Detached
from vae_cli.objective.bounds import Objective
from vae_cli.objective.divergences import (
    DIP,
    KL,
    MMD,
    MMD_SCALES,
    Adversarial,
    FactorVAE,
    SlicedWasserstein,
    TotalCorrelation,
    permute_dims,
)
from vae_cli.objective.likelihoods import Bernoulli
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import DiagonalGaussian, Planar
from vae_cli.objective.priors import LearnedPrior, MixturePrior, NormalPrior, Prior, VampPrior
from vae_cli.objective.rules import Design
from vae_cli.training.step import Stepper, auxiliary_step


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run thousands of tiny ops (batches of 4 to 512 points) that gain nothing
    from intra-op threads; on a busy 2-core box OpenMP's spin-waits made single tests take
    30 s instead of 0.1 s. The previous setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _posterior(b=6, d=3, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    mu = spread * torch.randn(b, d, generator=g)
    std = torch.rand(b, d, generator=g) * 1.2 + 0.3
    return Independent(Normal(mu, std), 1)


def _gauss_kl(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) per coordinate, the textbook closed form."""
    return torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def _normal_logpdf(z, loc, std):
    return -0.5 * ((z - loc) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


class _Shifted(Prior):
    """N(shift, I): a prior whose distance to N(0, I) is known (W1 = |shift|)."""

    def __init__(self, shift):
        super().__init__(len(shift))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32))

    def dist(self):
        return Independent(Normal(self.shift, torch.ones_like(self.shift)), 1)


# --------------------------------------------------------------------------------------- KL


def _vamp(d=3):
    prior = VampPrior(components=4, latent_dim=d, shape=(1, 2, 2))
    torch.manual_seed(30)  # the encoder's init
    lin = nn.Linear(4, 2 * d)

    def posterior(x):
        mu, logvar = lin(x.flatten(1)).chunk(2, dim=-1)
        return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)

    prior.bind(posterior)
    return prior


@pytest.mark.parametrize(("prior", "analytic"), [
    (lambda: NormalPrior(latent_dim=3), True),
    (lambda: LearnedPrior(latent_dim=3), True),
    (lambda: MixturePrior(components=3, latent_dim=3), False),
    (lambda: _vamp(), False),
])
def test_auto_estimator_picks_closed_form_only_where_one_exists(prior, analytic):
    kl = KL()
    kl.bind(prior())
    assert kl._analytic is analytic


def test_mc_estimator_is_forced_even_with_a_closed_form():
    kl = KL(estimator="mc")
    kl.bind(NormalPrior(latent_dim=3))
    assert kl._analytic is False


def test_analytic_estimator_refuses_a_mixture():
    with pytest.raises(UserError, match="analytic"):
        rules.check(Design(prior=MixturePrior(components=2, latent_dim=3),
                            divergence=KL(estimator="analytic")))


def test_analytic_kl_against_learned_prior_matches_closed_form():
    prior = _randomised(LearnedPrior(latent_dim=3))
    q = _posterior()
    kl = KL()
    kl.bind(prior)
    torch.manual_seed(0)
    out = kl(q, q.rsample(), prior)["div"]
    p_std = torch.exp(0.5 * prior.logvar)
    expected = _gauss_kl(q.mean, q.stddev, prior.loc, p_std).sum(1).mean()
    assert torch.allclose(out, expected, atol=1e-5)


def test_analytic_kl_against_the_standard_normal_matches_closed_form():
    """NormalPrior writes its KL out; it must be KL(q || N(0, I)) per example, also for the
    values a clamped log-variance reaches, and leave other posteriors to torch's formulas."""
    prior = NormalPrior(latent_dim=3)
    q = _posterior()
    expected = _gauss_kl(q.mean, q.stddev, torch.zeros(3), torch.ones(3)).sum(1)
    assert torch.allclose(prior.kl(q), expected, atol=1e-6)
    far = Independent(Normal(torch.tensor([[5.0, -3.0]]), torch.tensor([[math.exp(-3.0),
                                                                          math.exp(1.0)]])), 1)
    assert torch.allclose(NormalPrior(latent_dim=2).kl(far),
                          torch.distributions.kl_divergence(far, Independent(
                              Normal(torch.zeros(2), torch.ones(2)), 1)), atol=1e-5)
    kl = KL()
    kl.bind(prior)
    assert torch.allclose(kl(q, q.rsample(), prior)["div"], expected.mean(), atol=1e-6)


def test_mc_kl_against_one_component_mixture_converges_to_closed_form():
    # A 1-component mixture is a Gaussian, but torch has no KL for MixtureSameFamily, so the
    # estimator is Monte Carlo: with 100k draws it must land on the Gaussian closed form.
    prior = _randomised(MixturePrior(components=1, latent_dim=3))
    q = _posterior(b=4)
    kl = KL()
    kl.bind(prior)
    assert kl._analytic is False
    torch.manual_seed(1)
    z = q.sample((25000,))  # [S, B, D]: forward averages log q - log p over all of them
    mc = kl(q, z, prior)["div"]
    exact = _gauss_kl(q.mean, q.stddev, prior.loc[0], torch.exp(0.5 * prior.logvar[0]))
    assert mc.item() == pytest.approx(exact.sum(1).mean().item(), abs=0.03)


def test_mc_kl_against_mixture_matches_an_independent_estimate():
    prior = _randomised(MixturePrior(components=3, init_spread=2.0, latent_dim=2))
    q = _posterior(b=4, d=2)
    kl = KL()
    kl.bind(prior)
    torch.manual_seed(2)
    mc = kl(q, q.sample((20000,)), prior)["div"]
    # Independent estimate: other draws, hand-written log q and mixture logsumexp.
    g = torch.Generator().manual_seed(3)
    mu, std = q.mean, q.stddev
    z = mu + std * torch.randn(100000, *mu.shape, generator=g)  # [S, B, D]
    log_q = _normal_logpdf(z, mu, std).sum(-1)
    p_std = torch.exp(0.5 * prior.logvar)
    comp = _normal_logpdf(z[..., None, :], prior.loc, p_std).sum(-1)  # [S, B, K]
    log_p = torch.logsumexp(comp + torch.log_softmax(prior.logits, 0), dim=-1)
    independent = (log_q - log_p).mean()
    assert mc.item() == pytest.approx(independent.item(), abs=0.03)


def test_free_bits_floors_each_dimension_and_reports_the_true_kl():
    g = torch.Generator().manual_seed(4)
    # dims 0 and 1 close to the prior (KL << 1 nat), dim 2 far from it
    mu = torch.cat([0.05 * torch.randn(8, 2, generator=g), 3 + torch.randn(8, 1, generator=g)],
                   1).requires_grad_(True)
    std = torch.full((8, 3), 0.9)
    q = Independent(Normal(mu, std), 1)
    prior = NormalPrior(latent_dim=3)
    kl = KL(free_bits=0.5)
    kl.bind(prior)
    torch.manual_seed(31)  # the analytic KL ignores z, but draw it reproducibly anyway
    out = kl(q, q.rsample(), prior)
    per_dim = _gauss_kl(mu, std, torch.zeros(3), torch.ones(3)).mean(0)
    assert per_dim[:2].max() < 0.5 < per_dim[2]  # the floor is active on exactly two dims
    assert torch.allclose(out["div"], torch.clamp(per_dim, min=0.5).sum(), atol=1e-5)
    assert torch.allclose(out["kl"], per_dim.sum(), atol=1e-5)
    plain = KL()
    plain.bind(prior)
    assert torch.allclose(out["kl"], plain(q, q.rsample(), prior)["div"], atol=1e-5)
    # The floor takes the gradient away from the dims under it, and only from them.
    out["div"].backward()
    assert mu.grad[:, :2].abs().max() == 0
    assert mu.grad[:, 2].abs().min() > 0


def test_free_bits_with_learned_prior():
    prior = _randomised(LearnedPrior(latent_dim=3))
    q = _posterior()
    kl = KL(free_bits=1.0)
    kl.bind(prior)
    out = kl(q, q.mean, prior)
    per_dim = _gauss_kl(q.mean, q.stddev, prior.loc, torch.exp(0.5 * prior.logvar)).mean(0)
    assert torch.allclose(out["div"], per_dim.clamp(min=1.0).sum(), atol=1e-5)
    assert torch.allclose(out["kl"], per_dim.sum(), atol=1e-5)


@pytest.mark.parametrize(("estimator", "prior"), [
    ("auto", lambda: MixturePrior(components=3, latent_dim=3)),
    ("mc", lambda: NormalPrior(latent_dim=3)),
])
def test_free_bits_needs_a_per_dimension_kl(estimator, prior):
    with pytest.raises(UserError, match="free_bits"):
        rules.check(Design(prior=prior(), divergence=KL(free_bits=0.5, estimator=estimator)))


def test_free_bits_must_be_non_negative():
    with pytest.raises(UserError, match="free_bits"):
        KL(free_bits=-0.1)


# -------------------------------------------------------------------------------------- MMD


def _mmd_double_loop(x, y, kernel, prior_scale):
    """The unbiased MMD^2 U-statistic, one pair at a time."""
    d = x.shape[1]

    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        total = 0.0
        for s in MMD_SCALES:
            c = 2.0 * d * prior_scale**2 * s
            total += c / (c + d2) if kernel == "imq" else math.exp(-d2 / c)
        return total

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_scales_are_wae_scales():
    assert MMD_SCALES == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize(("m", "prior_scale"), [(4, 1.0), (3, 1.5)])
def test_mmd_equals_hand_written_u_statistic(kernel, m, prior_scale):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    y = 0.7 + torch.randn(m, 2, generator=g, dtype=torch.float64)
    got = MMD(kernel=kernel, prior_scale=prior_scale).mmd(x, y)
    assert got.item() == pytest.approx(_mmd_double_loop(x, y, kernel, prior_scale), abs=1e-9)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_of_a_distribution_with_itself_is_zero_on_average(kernel):
    # Unbiased: single batches scatter around 0 (std ~0.04 at n=64), some below it; the
    # mean of 100 independent batches has standard error ~0.004.
    mmd = MMD(kernel=kernel)
    g = torch.Generator().manual_seed(6)
    same = torch.stack([mmd.mmd(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))
                        for _ in range(100)])
    assert (same < 0).any()
    assert abs(same.mean().item()) < 0.015
    # the same batches with a 0.5 shift average ~0.12: the tolerance above does discriminate
    shift = torch.tensor([0.5, 0.0])
    other = torch.stack([mmd.mmd(torch.randn(64, 2, generator=g),
                                 shift + torch.randn(64, 2, generator=g)) for _ in range(100)])
    assert other.mean().item() > 0.06


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_mmd_grows_with_mean_shift(kernel):
    mmd = MMD(kernel=kernel)
    g = torch.Generator().manual_seed(7)
    x, noise = torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g)
    # common random numbers: only the shift changes between the four values
    vals = [mmd.mmd(x, noise + torch.tensor([s, 0.0])).item() for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(vals[0]) < 0.02
    assert all(b > a + 0.05 for a, b in itertools.pairwise(vals))


def test_mmd_forward_compares_z_with_prior_samples():
    mmd = MMD()
    g = torch.Generator().manual_seed(8)
    near = torch.randn(256, 2, generator=g)
    torch.manual_seed(9)
    assert abs(mmd(None, near, NormalPrior(latent_dim=2))["div"].item()) < 0.02
    torch.manual_seed(9)
    assert mmd(None, near + 2, NormalPrior(latent_dim=2))["div"].item() > 0.5


def test_mmd_rejects_bad_options():
    with pytest.raises(UserError, match="kernel"):
        MMD(kernel="laplace")
    with pytest.raises(UserError, match="prior_scale=0 must be > 0"):  # else NaN at step 1
        MMD(prior_scale=0)
    with pytest.raises(UserError, match="batch_size"):
        MMD().mmd(torch.zeros(1, 2), torch.zeros(5, 2))


# --------------------------------------------------------------------------- sliced Wasserstein


@pytest.mark.parametrize(("m1", "s1", "m2", "s2"),
                         [(0.0, 1.0, 1.0, 2.0), (0.5, 0.3, -1.0, 1.2), (2.0, 1.0, 2.0, 1.5)])
def test_sliced_w2_in_one_dimension_matches_gaussian_closed_form(m1, s1, m2, s2):
    # d = 1: every projection is +-1, so SW_2^2 is W_2^2 = (m1-m2)^2 + (s1-s2)^2; with 100k
    # samples the empirical value is within ~1.5% over seeds 0-9.
    g = torch.Generator().manual_seed(10)
    x = m1 + s1 * torch.randn(100000, 1, generator=g)
    y = m2 + s2 * torch.randn(100000, 1, generator=g)
    torch.manual_seed(11)
    got = SlicedWasserstein(projections=4, p=2).distance(x, y).item()
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=0.04)


def test_sliced_w1_in_one_dimension_equals_sorted_difference():
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(300, 1, generator=g), 0.5 + 2 * torch.rand(300, 1, generator=g)
    w1 = (x.flatten().sort().values - y.flatten().sort().values).abs().mean()
    torch.manual_seed(13)
    got = SlicedWasserstein(projections=7, p=1).distance(x, y)
    assert torch.allclose(got, w1, rtol=1e-6, atol=1e-6)


def test_sliced_is_zero_for_identical_batches_and_positive_otherwise():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(200, 4, generator=g)
    torch.manual_seed(15)
    sw = SlicedWasserstein(projections=20)
    assert sw.distance(x, x[torch.randperm(200)]).item() < 1e-10
    assert sw.distance(x, x + 1).item() > 0.1


def test_sliced_forward_uses_prior_samples():
    g = torch.Generator().manual_seed(16)
    z = torch.randn(2000, 2, generator=g)
    torch.manual_seed(17)
    sw = SlicedWasserstein(projections=50)
    assert sw(None, z, NormalPrior(latent_dim=2))["div"].item() < 0.02
    # shifted by a vector of norm 2: SW_2^2 = E_theta (theta . shift)^2 = |shift|^2 / d = 2
    assert sw(None, z, _Shifted([2.0**0.5, 2.0**0.5]))["div"].item() == pytest.approx(2, rel=0.3)


@pytest.mark.parametrize("kw", [{"projections": 0}, {"p": 0.5}, {"beta": -1}])
def test_sliced_rejects_bad_options(kw):
    with pytest.raises(UserError):
        SlicedWasserstein(**kw)


# ------------------------------------------------------------------------------- adversarial


def latents(z, prior):
    """A batch of latents as the auxiliary step gets it (no x or decoder output needed)."""
    return Detached(z, z, z, prior)


def _fit(adv, zq, prior, opt=None):
    """adv.auxiliary_steps critic steps, as the training step takes them."""
    opt = opt or adv.auxiliary_optimizer()
    auxiliary_step(adv, opt, latents(zq, prior), lambda params: None)
    return opt


@pytest.mark.parametrize("lipschitz, lr", [("gp", 1e-3), ("clip", 5e-5), ("spectral", 1e-3)])
def test_critic_estimates_w1_between_shifted_gaussians(lipschitz, lr):
    # 300 steps of a 64-unit critic, fresh samples, seeds 0-3: gp 2.09-2.30 (the soft
    # penalty lets it overshoot the Lipschitz bound a little), clip 2.26-2.40 (RMSprop at
    # the WGAN paper's 5e-5), spectral 1.96-2.02; untrained critics give |w| < 0.3 (gp).
    torch.manual_seed(18)
    adv = Adversarial(hidden=64, lr=lr, critic_steps=300, latent_dim=2, lipschitz=lipschitz)
    prior = _Shifted([2.0**0.5, 2.0**0.5])  # |shift| = 2 = W1(N(0,I), N(shift,I))
    zq = torch.randn(512, 2)
    with torch.no_grad():
        untrained = adv.w1(zq, prior.sample(512)).item()
    assert not 1.5 < untrained < 2.5  # the window below does not hold by luck
    _fit(adv, zq, prior)
    # the trained critic generalises to fresh samples of both sides
    with torch.no_grad():
        fresh = adv.w1(torch.randn(4096, 2), prior.sample(4096)).item()
    assert 1.5 < fresh < 2.5


def test_clipped_and_spectral_critics_hold_their_constraint():
    prior, zq = _Shifted([1.0, 0.0]), torch.randn(64, 2)
    clipped = Adversarial(hidden=8, lr=1e-2, critic_steps=20, latent_dim=2, lipschitz="clip",
                          clip=0.05)
    assert isinstance(clipped.auxiliary_optimizer(), torch.optim.RMSprop)
    _fit(clipped, zq, prior)
    weights = torch.cat([p.flatten() for p in clipped.critic.parameters()])
    assert weights.abs().max() == pytest.approx(0.05)  # pushed to the bound, never past it
    spectral = Adversarial(hidden=8, lr=1e-2, critic_steps=20, latent_dim=2,
                           lipschitz="spectral")
    _fit(spectral, zq, prior)
    with torch.no_grad():  # one power iteration per forward: settled after a few
        for _ in range(30):
            spectral.critic(zq)
    for layer in (m for m in spectral.critic if isinstance(m, torch.nn.Linear)):
        assert torch.linalg.matrix_norm(layer.weight, ord=2) <= 1 + 1e-3
    again = Adversarial(hidden=8, latent_dim=2, lipschitz="spectral")
    again.load_state_dict(spectral.state_dict())
    z = torch.randn(16, 2)
    assert torch.equal(again.w1(z, z + 1), spectral.w1(z, z + 1))
    with pytest.raises(UserError, match="divergence.lipschitz"):
        Adversarial(latent_dim=2, lipschitz="box")


def _adv_objective(latent=3):
    nets = mlp.build(latent_dim=latent, shape=(1, 4, 4), hidden=[8])
    adv = Adversarial(hidden=16, critic_steps=2, lr=1e-3, latent_dim=latent)
    model = VAE(nets, DiagonalGaussian(), NormalPrior(latent_dim=latent), Bernoulli(), latent)
    return Objective(model, adv), adv


def test_critic_is_not_trained_by_the_main_optimizer():
    torch.manual_seed(19)
    objective, adv = _adv_objective()
    trainable = {id(p) for p in objective.main_parameters()}
    critic = {id(p) for p in adv.critic.parameters()}
    assert critic and not trainable & critic
    assert trainable | critic == {id(p) for p in objective.parameters()}
    # frozen outside its own step: the main backward never computes its gradients
    out, _ = objective(torch.bernoulli(torch.rand(8, 1, 4, 4)))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in adv.critic.parameters())


def test_only_the_auxiliary_step_fits_the_critic():
    torch.manual_seed(20)
    objective, adv = _adv_objective()
    x = torch.bernoulli(torch.rand(8, 1, 4, 4))
    before = copy.deepcopy(adv.critic.state_dict())

    def unchanged():
        return all(torch.equal(before[k], v) for k, v in adv.critic.state_dict().items())

    objective.eval()
    objective(x)
    assert unchanged()
    objective.train()
    out, _ = objective(x)  # a forward in training does not touch it either
    assert unchanged() and torch.isfinite(out["loss"])
    opt = torch.optim.Adam(objective.main_parameters(), 1e-3)
    stepper = Stepper(objective, objective, opt, torch.device("cpu"),
                      aux_opts=[adv.auxiliary_optimizer()])
    encoder = [p.detach().clone() for p in objective.model.encoder.parameters()]
    stepper(x, 0)
    assert not unchanged()  # the critic stepped after the main step ...
    assert not all(torch.equal(a, b) for a, b in  # ... and so did the encoder
                   zip(encoder, objective.model.encoder.parameters(), strict=True))
    assert not any(p.requires_grad for p in adv.critic.parameters())


def test_critic_and_its_optimizer_round_trip_through_state_dicts():
    # what a checkpoint keeps: the divergence's state_dict and the auxiliary optimizer's
    torch.manual_seed(21)
    objective, adv = _adv_objective()
    opt = _fit(adv, torch.randn(16, 3), objective.model.prior)
    weights, moments = copy.deepcopy(adv.state_dict()), copy.deepcopy(opt.state_dict())
    assert any(k.startswith("critic.") for k in weights) and moments["state"]
    torch.manual_seed(22)
    fresh, fresh_adv = _adv_objective()
    fresh_adv.load_state_dict(weights)
    fresh_opt = fresh_adv.auxiliary_optimizer()
    fresh_opt.load_state_dict(moments)
    # Same weights + same Adam moments => the next critic steps are identical.
    zq = torch.randn(16, 3)
    for o, d, m in ((opt, adv, objective), (fresh_opt, fresh_adv, fresh)):
        torch.manual_seed(23)
        _fit(d, zq, m.model.prior, o)
    for p, r in zip(adv.critic.parameters(), fresh_adv.critic.parameters(), strict=True):
        assert torch.allclose(p, r, atol=1e-7)


@pytest.mark.parametrize("kw", [{"critic_steps": 0}, {"hidden": 0}, {"lr": 0.0}])
def test_adversarial_rejects_bad_options(kw):
    with pytest.raises(UserError):
        Adversarial(latent_dim=2, **kw)


# ------------------------------------------------------------------------ total correlation


def test_tc_is_near_zero_for_factorised_latents():
    # Means independent across dims and wide posteriors: the aggregate posterior is close to
    # a product of its marginals. The batch is the whole dataset (N = M).
    g = torch.Generator().manual_seed(24)
    m, d = 1000, 3
    mu = torch.randn(m, d, generator=g)
    q = Independent(Normal(mu, torch.ones(m, d)), 1)
    z = mu + torch.randn(m, d, generator=g)
    t = TotalCorrelation(dataset_size=m).terms(q, z, NormalPrior(latent_dim=d))
    assert abs(t["tc"].item()) < 0.1


def test_tc_is_large_for_strongly_correlated_latents():
    # Every dim copies one scalar: the aggregate posterior lives near the diagonal.
    g = torch.Generator().manual_seed(25)
    m, d = 1000, 3
    mu = 3 * torch.randn(m, 1, generator=g).expand(m, d)
    q = Independent(Normal(mu, torch.full((m, d), 0.1)), 1)
    z = mu + 0.1 * torch.randn(m, d, generator=g)
    t = TotalCorrelation(dataset_size=m).terms(q, z, NormalPrior(latent_dim=d))
    assert t["tc"].item() > 3.0


@pytest.mark.parametrize("estimator", ["mss", "mws"])
@pytest.mark.parametrize("prior", [lambda: NormalPrior(latent_dim=3),
                                   lambda: _randomised(MixturePrior(components=2, latent_dim=3))])
def test_tc_terms_sum_to_the_monte_carlo_kl(estimator, prior):
    prior = prior()
    q = _posterior(b=32)
    torch.manual_seed(26)
    z = q.rsample()
    tc = TotalCorrelation(alpha=1, beta=1, gamma=1, estimator=estimator, dataset_size=500)
    out = tc(q, z, prior)
    mc_kl = (q.log_prob(z) - prior.log_prob(z)).mean()
    assert torch.allclose(out["mi"] + out["tc"] + out["dwkl"], mc_kl, atol=1e-4)
    assert torch.allclose(out["kl"], mc_kl, atol=1e-4)
    assert torch.allclose(out["div"], mc_kl, atol=1e-4)


def _tc_by_hand(mu, std, z, n, estimator):
    """log q(z_i) and log prod_d q(z_id) with explicit importance weights, pair by pair."""
    b, d = mu.shape
    m = b - 1

    def weight(i, j):
        if estimator == "mws":
            return 1.0 / (n * b)
        if i == j:
            return 1.0 / n
        return (n - m) / (n * m) if j == (i + 1) % b else 1.0 / m

    def pdf(i, j, k):
        return math.exp(_normal_logpdf(z[i, k], mu[j, k], std[j, k]).item())

    log_qz, log_prod = [], []
    for i in range(b):
        log_qz.append(math.log(sum(weight(i, j) * math.prod(pdf(i, j, k) for k in range(d))
                                   for j in range(b))))
        log_prod.append(sum(math.log(sum(weight(i, j) * pdf(i, j, k) for j in range(b)))
                            for k in range(d)))
    return torch.tensor(log_qz), torch.tensor(log_prod)


@pytest.mark.parametrize("estimator", ["mss", "mws"])
def test_tc_terms_match_hand_written_weights(estimator):
    q = _posterior(b=5, d=2, spread=0.5)
    g = torch.Generator().manual_seed(27)
    z = q.mean + q.stddev * torch.randn(5, 2, generator=g)
    tc = TotalCorrelation(estimator=estimator, dataset_size=40)
    out = tc.terms(q, z, NormalPrior(latent_dim=2))
    log_qz, log_prod = _tc_by_hand(q.mean, q.stddev, z, 40, estimator)
    assert out["tc"].item() == pytest.approx((log_qz - log_prod).mean().item(), abs=1e-4)
    assert out["mi"].item() == pytest.approx((q.log_prob(z) - log_qz).mean().item(), abs=1e-4)


def test_mss_weights_are_a_distribution_per_row():
    # Each estimate of q(z_i) is a weighted average of posteriors, hence unbiased for N >= M.
    for b, n in [(2, 2), (5, 5), (8, 100)]:
        w = TotalCorrelation(dataset_size=n).log_weights(b, torch.device("cpu")).exp()
        assert torch.allclose(w.sum(1), torch.ones(b), atol=1e-6)
        assert torch.allclose(w.diagonal(), torch.full((b,), 1.0 / n))


def test_tc_div_weights_each_term():
    prior = NormalPrior(latent_dim=3)
    q = _posterior(b=16)
    torch.manual_seed(28)
    z = q.rsample()
    tc = TotalCorrelation(alpha=0.5, beta=6.0, gamma=2.0, dataset_size=100)
    out = tc(q, z, prior)
    expected = 0.5 * out["mi"] + 6.0 * out["tc"] + 2.0 * out["dwkl"]
    assert torch.allclose(out["div"], expected, atol=1e-5)
    assert not torch.allclose(out["div"], out["kl"], atol=1e-2)  # the weights did something
    assert tc.weight() == 1.0
    assert tc.bounds_likelihood


def test_tc_rejects_bad_input():
    with pytest.raises(UserError, match="alpha"):
        TotalCorrelation(alpha=-1, dataset_size=10)
    with pytest.raises(UserError, match="estimator"):
        TotalCorrelation(estimator="exact", dataset_size=10)
    q = _posterior(b=1)
    with pytest.raises(UserError, match="batch_size"):
        TotalCorrelation(dataset_size=10).terms(q, q.mean, NormalPrior(latent_dim=3))


# -------------------------------------------------------------------------------- factorvae


def _objective(div, latent=3, iw_samples=1):
    nets = mlp.build(latent_dim=latent, shape=(1, 4, 4), hidden=[8])
    model = VAE(nets, DiagonalGaussian(), NormalPrior(latent_dim=latent), Bernoulli(), latent)
    return Objective(model, div, iw_samples=iw_samples)


def _factorvae(**kw):
    return FactorVAE(**{"hidden": 16, "layers": 2, "lr": 1e-3, "latent_dim": 3, **kw})


def test_permuted_samples_keep_each_marginal_and_lose_the_dependence():
    torch.manual_seed(40)
    u = torch.randn(4096, 1)
    z = torch.cat([u, u, -u.exp()], dim=1)  # completely dependent columns
    p = permute_dims(z)
    for j in range(3):  # each column is a reordering of the same values
        assert torch.equal(p[:, j].sort().values, z[:, j].sort().values)
    assert not torch.equal(p[:, 0], z[:, 0])
    # ... by its own permutation: the columns no longer move together (|r| ~ 1/64 here)
    r = torch.corrcoef(p.T)
    assert torch.corrcoef(z.T)[0, 1] > 0.99
    assert r[0, 1].abs() < 0.1 and r[0, 2].abs() < 0.1 and r[1, 2].abs() < 0.1
    # nor through a non-linear link: P(same side of 0) is 1/2 for independent columns
    assert abs((p[:, 0] > 0).eq(p[:, 1] > 0).float().mean() - 0.5) < 0.05


def test_discriminator_estimates_the_tc_of_a_correlated_gaussian():
    # q(z) = N(0, S) fixed: TC = KL(q(z) || prod_j q(z_j)) = (sum_j log S_jj - log det S) / 2.
    # 300 steps of a 2 x 32 discriminator on batches of 256: seeds 0-7 gave 0.59-0.68 for
    # 0.655; untrained discriminators give |estimate| < 0.2.
    torch.manual_seed(41)
    cov = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 1.0]])
    tc = 0.5 * (cov.diagonal().log().sum() - torch.logdet(cov)).item()
    chol = torch.linalg.cholesky(cov)
    div = _factorvae(hidden=32, layers=2)
    with torch.no_grad():
        untrained = div.discriminator.log_ratio(torch.randn(4096, 3) @ chol.T).mean().item()
    assert abs(untrained - tc) > 0.3  # the window below does not hold by luck
    opt = div.auxiliary_optimizer()
    prior = NormalPrior(latent_dim=3)
    for _ in range(300):  # a fresh batch of q(z) samples per step, as in training
        auxiliary_step(div, opt, latents(torch.randn(256, 3) @ chol.T, prior), lambda p: None)
    with torch.no_grad():
        estimate = div.discriminator.log_ratio(torch.randn(8192, 3) @ chol.T).mean().item()
    assert abs(estimate - tc) < 0.15


def test_factorvae_div_is_kl_plus_gamma_tc():
    torch.manual_seed(42)
    q, prior = _posterior(b=16), NormalPrior(latent_dim=3)
    z = q.rsample()
    div = _factorvae(beta=2.0, gamma=7.0)
    div.bind(prior)
    out = div(q, z, prior)
    assert torch.allclose(out["kl"], KL()(q, z, prior)["div"])
    assert torch.allclose(out["tc"], div.discriminator.log_ratio(z).mean())
    assert torch.allclose(out["div"], 2.0 * out["kl"] + 7.0 * out["tc"])
    assert div.weight() == 1.0 and div.bounds_likelihood


def test_vae_loss_reaches_the_encoder_through_d_but_never_trains_d():
    torch.manual_seed(43)
    div = _factorvae(gamma=5.0)
    objective = _objective(div)
    x = torch.bernoulli(torch.rand(8, 1, 4, 4))
    torch.manual_seed(44)
    out, _ = objective(x)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in div.discriminator.parameters())
    with_tc = [p.grad.clone() for p in objective.model.encoder.parameters()]
    trainable = {id(p) for p in objective.main_parameters()}
    assert not trainable & {id(p) for p in div.discriminator.parameters()}
    # the same step with gamma = 0: the TC term moved the encoder's gradient
    objective.zero_grad()
    div.gamma = 0.0
    torch.manual_seed(44)
    objective(x)[0]["loss"].backward()
    assert not all(torch.allclose(a, p.grad) for a, p in
                   zip(with_tc, objective.model.encoder.parameters(), strict=True))


def test_only_the_discriminator_step_trains_d_and_it_leaves_the_vae_alone():
    torch.manual_seed(45)
    div = _factorvae()
    objective = _objective(div)
    x = torch.bernoulli(torch.rand(8, 1, 4, 4))

    def snapshot(module):
        return [p.detach().clone() for p in module.parameters()]

    def same(before, module):
        return all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))

    vae, d = snapshot(objective.model), snapshot(div.discriminator)
    out, batch = objective(x)
    auxiliary_step(div, div.auxiliary_optimizer(), batch, lambda p: None)
    assert same(vae, objective.model) and not same(d, div.discriminator)
    assert isinstance(div.auxiliary_optimizer(), torch.optim.Adam)
    assert div.auxiliary_optimizer().defaults["betas"] == (0.5, 0.9)
    # a whole training step moves both, each by its own optimizer
    opt = torch.optim.Adam(objective.main_parameters(), 1e-3)
    stepper = Stepper(objective, objective, opt, torch.device("cpu"),
                      aux_opts=[div.auxiliary_optimizer()])
    vae, d = snapshot(objective.model), snapshot(div.discriminator)
    stepper(x, 0)
    assert not same(vae, objective.model) and not same(d, div.discriminator)
    assert not any(p.requires_grad for p in div.discriminator.parameters())


def test_factorvae_with_a_mixture_prior_takes_the_monte_carlo_kl():
    prior = MixturePrior(components=3, latent_dim=3)
    div = _factorvae()
    div.bind(prior)
    assert div.kl._analytic is False


def test_factorvae_with_a_flow_posterior_takes_the_monte_carlo_kl():
    torch.manual_seed(49)
    family, div = Planar(steps=2), _factorvae()
    nets = mlp.build(latent_dim=3, shape=(1, 4, 4), hidden=[8],
                     posterior_outputs=family.outputs(3))
    model = VAE(nets, family, NormalPrior(latent_dim=3), Bernoulli(), 3)
    out, _ = Objective(model, div)(torch.bernoulli(torch.rand(8, 1, 4, 4)))
    assert div.kl._analytic is False and torch.isfinite(out["loss"])


@pytest.mark.parametrize("kw, fragment", [
    ({"gamma": -1.0}, "gamma"), ({"layers": 0}, "layers"), ({"hidden": 0}, "hidden"),
    ({"discriminator_steps": 0}, "discriminator_steps"), ({"lr": 0.0}, "lr"),
    ({"betas": (0.5,)}, "betas"), ({"beta": -1.0}, "beta"),
])
def test_factorvae_rejects_bad_options(kw, fragment):
    with pytest.raises(UserError, match=fragment):
        _factorvae(**kw)


def test_factorvae_refuses_iwae_and_tiny_batches():
    with pytest.raises(UserError, match="divergence=factorvae") as e:
        rules.check(Design(prior=NormalPrior(latent_dim=3), divergence=_factorvae(),
                           iw_samples=4))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="batch_size >= 4"):
        _factorvae().auxiliary_loss(latents(torch.randn(3, 3), NormalPrior(latent_dim=3)))


# -------------------------------------------------------------------------------------- dip


def _hand_covariance(mu, var, kind):
    """Cov by explicit sums over the batch (E[mu mu^T] - E[mu] E[mu]^T), plus E[var] for ii."""
    b, d = mu.shape
    c = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            c[i, j] = sum(mu[n, i] * mu[n, j] for n in range(b)) / b \
                - (sum(mu[:, i]) / b) * (sum(mu[:, j]) / b)
            if kind == "ii" and i == j:
                c[i, j] += sum(var[:, i]) / b
    return c


@pytest.mark.parametrize("kind, lambda_od, lambda_d", [("i", 3.0, None), ("ii", 2.0, 5.0)])
def test_dip_penalty_matches_a_hand_computation(kind, lambda_od, lambda_d):
    q = _posterior(b=5, d=3, seed=46, spread=2.0)
    mu, var = q.base_dist.loc.double(), q.base_dist.scale.double() ** 2
    c = _hand_covariance(mu, var, kind)
    ld = lambda_d if lambda_d is not None else 10 * lambda_od  # type i's default ratio
    expected = sum(lambda_od * c[i, j] ** 2 for i in range(3) for j in range(3) if i != j) \
        + sum(ld * (c[i, i] - 1) ** 2 for i in range(3))
    div = DIP(type=kind, lambda_od=lambda_od, lambda_d=lambda_d)
    assert torch.allclose(div.covariance(q).double(), c, atol=1e-5)
    prior = NormalPrior(latent_dim=3)
    div.bind(prior)
    out = div(q, q.rsample(), prior)
    assert out["dip"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(out["div"], out["kl"] + out["dip"])
    assert out["kl"] == pytest.approx(KL()(q, q.mean, prior)["div"].item())


def test_dip_default_diagonal_weights_follow_the_type():
    assert DIP(type="i", lambda_od=2.0).lambda_d == 20.0
    assert DIP(type="ii", lambda_od=2.0).lambda_d == 2.0
    assert DIP(type="ii", lambda_od=2.0, lambda_d=0.5).lambda_d == 0.5


def test_dip_ii_adds_the_mean_posterior_variance():
    q = _posterior(b=8, seed=47)
    extra = DIP(type="ii").covariance(q) - DIP(type="i").covariance(q)
    assert torch.allclose(extra, torch.diag(q.base_dist.scale.pow(2).mean(0)), atol=1e-6)


def test_dip_is_zero_penalty_for_whitened_means():
    # encoder means with identity batch covariance and tiny variances: no penalty under i
    g = torch.Generator().manual_seed(48)
    mu = torch.randn(64, 3, generator=g)
    mu = mu - mu.mean(0)
    mu = mu @ torch.linalg.inv(torch.linalg.cholesky(mu.T @ mu / 64)).T
    q = Independent(Normal(mu, torch.full_like(mu, 1e-4)), 1)
    assert DIP(type="i").penalty(DIP(type="i").covariance(q)).item() < 1e-8


@pytest.mark.parametrize("prior", [
    lambda: LearnedPrior(latent_dim=3), lambda: MixturePrior(components=3, latent_dim=3),
    lambda: _vamp(),
])
def test_dip_refuses_priors_other_than_the_standard_normal(prior):
    with pytest.raises(UserError, match="prior=normal") as e:
        rules.check(Design(prior=prior(), divergence=DIP()))
    assert "\n" not in str(e.value)


def test_dip_refuses_flow_posteriors():
    with pytest.raises(UserError, match="posterior=gaussian") as e:
        rules.check(Design(Planar(steps=2), NormalPrior(latent_dim=3), DIP()))
    assert "\n" not in str(e.value)
    rules.check(Design(DiagonalGaussian(), NormalPrior(latent_dim=3), DIP()))


def test_dip_refuses_bad_options_iwae_and_single_examples():
    with pytest.raises(UserError, match="divergence.type"):
        DIP(type="iii")
    with pytest.raises(UserError, match="lambda"):
        DIP(lambda_od=-1.0)
    with pytest.raises(UserError, match="divergence=dip"):
        rules.check(Design(prior=NormalPrior(latent_dim=3), divergence=DIP(), iw_samples=2))
    q = _posterior(b=1)
    with pytest.raises(UserError, match="batch_size >= 2"):
        DIP()(q, q.mean, NormalPrior(latent_dim=3))
