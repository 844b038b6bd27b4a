"""Reconstruction terms against torch.distributions and hand-computed bin probabilities."""

import math

import pytest
import torch
from torch.distributions import Categorical as TCategorical
from torch.distributions import Laplace as TLaplace
from torch.distributions import Normal

from vae_cli.errors import UserError
from vae_cli.objective.likelihoods import (
    Bernoulli,
    Categorical,
    DiscretizedLogistic,
    Gaussian,
    Laplace,
    SquaredError,
)

B, C, H, W = 4, 3, 5, 5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=g), torch.rand(B, C, H, W, generator=g)


def _grid(seed, shape=(B, C, H, W)):
    """8-bit images: x = level / 255 with random levels (all 256 reachable)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, shape, generator=g)
    return levels, levels.float() / 255


# --------------------------------------------------------------------------- Gaussian / Laplace


@pytest.mark.parametrize("sigma", [0.05, 0.3, 2.0])
def test_gaussian_matches_torch_normal(sigma):
    mean, x = _data(1)
    expected = -Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    got = Gaussian(sigma=sigma).nll(mean, x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_mse_is_the_plain_sum_of_squares_and_a_gaussian_of_variance_one_half():
    mean, x = _data(2)
    got = SquaredError().nll(mean, x)
    assert torch.allclose(got, ((x - mean) ** 2).flatten(1).sum(1))
    d = C * H * W
    half = -Normal(mean, 0.5**0.5).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(got, half - d / 2 * math.log(math.pi), rtol=1e-5, atol=1e-3)
    for sigma in (0.1, 0.7):  # the formula the README states for loss=gaussian
        want = got / (2 * sigma**2) + d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        assert torch.allclose(Gaussian(sigma=sigma).nll(mean, x), want, rtol=1e-5, atol=1e-3)


def test_fixed_gaussian_sigma_is_a_buffer_not_a_parameter():
    lik = Gaussian(sigma=0.2)
    assert list(lik.parameters()) == []
    assert "log_scale" in dict(lik.named_buffers())


def test_learned_gaussian_sigma_matches_torch_and_gets_its_gradient():
    lik = Gaussian(sigma=0.1, learn_sigma=True)
    assert isinstance(lik.log_scale, torch.nn.Parameter)
    with torch.no_grad():
        lik.log_scale.fill_(math.log(0.3))  # a value other than the initial one
    mean, x = _data(2)
    got = lik.nll(mean, x)
    assert torch.allclose(got, -Normal(mean, 0.3).log_prob(x).flatten(1).sum(1), rtol=1e-5)
    got.sum().backward()
    # d/d log(sigma) of sum_i [(x_i - m_i)^2 / (2 sigma^2) + log sigma] = sum_i [1 - r_i^2]
    r2 = ((x - mean) / 0.3) ** 2
    assert lik.log_scale.grad.item() == pytest.approx((1 - r2).sum().item(), rel=1e-4)


@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_laplace_matches_torch_laplace(scale):
    loc, x = _data(3)
    expected = -TLaplace(loc, scale).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(Laplace(scale=scale).nll(loc, x), expected, rtol=1e-5, atol=1e-3)


def test_learned_laplace_scale_matches_torch_and_gets_its_gradient():
    lik = Laplace(scale=0.1, learn_scale=True)
    assert isinstance(lik.log_scale, torch.nn.Parameter)
    with torch.no_grad():
        lik.log_scale.fill_(math.log(0.4))
    loc, x = _data(4)
    got = lik.nll(loc, x)
    assert torch.allclose(got, -TLaplace(loc, 0.4).log_prob(x).flatten(1).sum(1), rtol=1e-5)
    got.sum().backward()
    # d/d log(b) of sum_i [|x_i - m_i| / b + log b] = sum_i [1 - |x_i - m_i| / b]
    expected = (1 - (x - loc).abs() / 0.4).sum()
    assert lik.log_scale.grad.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize(("cls", "kw"), [(Gaussian, {"sigma": 0.0}), (Gaussian, {"sigma": -1}),
                                         (Laplace, {"scale": 0.0})])
def test_scale_must_be_positive(cls, kw):
    with pytest.raises(UserError, match=next(iter(kw))):
        cls(**kw)


# --------------------------------------------------------------------------------- Categorical


def test_categorical_matches_torch_categorical_over_256_levels():
    g = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(B, C, 256, H, W, generator=g)
    out = logits.reshape(B, C * 256, H, W)  # channel c's 256 logits are contiguous
    levels, x = _grid(6)
    expected = -TCategorical(logits=logits.permute(0, 1, 3, 4, 2)).log_prob(levels)
    got = Categorical().nll(out, x)
    assert torch.allclose(got, expected.flatten(1).sum(1), rtol=1e-5)
    # off-grid values round to the nearest level: round(x * 255)
    jitter = (torch.rand(x.shape, generator=g) - 0.5) * 0.9 / 255
    assert torch.allclose(Categorical().nll(out, (x + jitter).clamp(0, 1)), got)


def test_categorical_mean_is_expected_level():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, C, 256, H, W, generator=g)
    mean = Categorical().mean(logits.reshape(B, C * 256, H, W))
    expected = (logits.softmax(2) * torch.arange(256.0).view(1, 1, -1, 1, 1)).sum(2) / 255
    assert torch.allclose(mean, expected, atol=1e-6)


def test_categorical_options():
    assert Categorical().out_mult == 256
    assert Categorical(classes=16).out_mult == 16
    with pytest.raises(UserError, match="classes"):
        Categorical(classes=1)


# ------------------------------------------------------------------------------------ Logistic


def _logistic_params(n, seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.rand(n, generator=g) * 3 - 1.5
    log_scale = torch.rand(n, generator=g) * 4 - 4.5  # scales from ~0.01 to ~0.6
    return loc, log_scale


def _logistic_nll_per_level(loc, log_scale, levels):
    """nll of one pixel per row: out is [N, 2, 1, 1] (loc, log-scale), x is [N, 1, 1, 1]."""
    out = torch.stack([loc, log_scale], 1).view(-1, 2, 1, 1)
    return DiscretizedLogistic().nll(out, (levels.float() / 255).view(-1, 1, 1, 1))


def test_logistic_probabilities_over_all_levels_sum_to_one():
    loc, log_scale = _logistic_params(20, seed=8)
    levels = torch.arange(256).repeat_interleave(20)
    nll = _logistic_nll_per_level(loc.repeat(256), log_scale.repeat(256), levels)
    total = nll.view(256, 20).neg().exp().sum(0)
    assert torch.allclose(total, torch.ones(20), atol=1e-4)


def _middle_bins(seed):
    loc, log_scale = _logistic_params(200, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    levels = torch.randint(1, 255, (200,), generator=g)
    got = -_logistic_nll_per_level(loc, log_scale, levels)
    y = 2 * levels.double() / 255 - 1
    return got.double(), y, loc.double(), log_scale.double().exp()


def test_logistic_middle_bin_is_cdf_difference_in_float64():
    got, y, mu, s = _middle_bins(9)
    p = torch.sigmoid((y + 1 / 255 - mu) / s) - torch.sigmoid((y - 1 / 255 - mu) / s)
    # Below ~1e-6 the float64 difference of two sigmoids near 1 loses its digits; the next
    # test covers the tails.
    keep = p > 1e-6
    assert keep.sum() > 100
    assert torch.allclose(got[keep].exp(), p[keep], rtol=1e-4, atol=1e-7)


def test_logistic_middle_bin_is_accurate_in_the_tails():
    # The same mass, written as a difference of two lower-tail sigmoids on whichever side of
    # the mean the bin lies, so float64 keeps every digit; the nll must follow it to 1e-4
    # nats even where the mass is 1e-15 or less.
    got, y, mu, s = _middle_bins(19)
    hi, lo = (y + 1 / 255 - mu) / s, (y - 1 / 255 - mu) / s
    p = torch.where(lo > 0, torch.sigmoid(-lo) - torch.sigmoid(-hi),
                    torch.sigmoid(hi) - torch.sigmoid(lo))
    assert (p < 1e-12).sum() > 10 and (p > 1e-3).sum() > 10  # both regimes are exercised
    keep = p > 1e-250
    assert torch.allclose(got[keep], p[keep].log(), rtol=1e-5, atol=1e-4)


def test_logistic_edge_bins_are_open_ended():
    loc, log_scale = _logistic_params(50, seed=11)
    mu, s = loc.double(), log_scale.double().exp()
    low = -_logistic_nll_per_level(loc, log_scale, torch.zeros(50, dtype=torch.long))
    high = -_logistic_nll_per_level(loc, log_scale, torch.full((50,), 255))
    p_low = torch.sigmoid((-1 + 1 / 255 - mu) / s)  # P(X <= -1 + 1/255)
    p_high = torch.sigmoid(-(1 - 1 / 255 - mu) / s)  # P(X > 1 - 1/255)
    keep = (p_low > 1e-250) & (p_high > 1e-250)
    assert keep.sum() > 30
    assert torch.allclose(low.double()[keep], p_low[keep].log(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(high.double()[keep], p_high[keep].log(), rtol=1e-5, atol=1e-4)


def test_logistic_is_finite_for_sharp_and_distant_predictions():
    # At the floor scale e^-7 and centred on the pixel, the bin [y - 1/255, y + 1/255] holds
    # 2 sigmoid(e^7 / 255) - 1 = 0.973 of the mass (0.987 at an edge, open on one side); far
    # away the mass underflows float32 in a naive sigmoid difference but stays finite here.
    levels = torch.tensor([0, 17, 128, 255])
    loc = 2 * levels.float() / 255 - 1
    nll = _logistic_nll_per_level(loc, torch.full((4,), -7.0), levels)
    h = math.exp(7) / 255
    expected = torch.tensor([math.log(1 + math.exp(-h)), -math.log(2 / (1 + math.exp(-h)) - 1)])
    assert torch.allclose(nll, expected[[0, 1, 1, 0]], rtol=1e-3)
    far = _logistic_nll_per_level(-loc, torch.full((4,), -7.0), torch.tensor([1, 17, 100, 200]))
    assert torch.isfinite(far).all() and far.min() > 10


def test_logistic_log_scale_is_floored():
    levels = torch.tensor([3, 100, 250])
    loc = torch.tensor([-0.9, 0.1, 0.9])
    at_floor = _logistic_nll_per_level(loc, torch.full((3,), -7.0), levels)
    below = _logistic_nll_per_level(loc, torch.full((3,), -20.0), levels)
    assert torch.equal(at_floor, below)


def test_logistic_channel_layout_is_loc_then_log_scale():
    levels, x = _grid(12, shape=(2, C, 3, 3))
    g = torch.Generator().manual_seed(13)
    loc, log_scale = torch.randn(2, C, 3, 3, generator=g), torch.randn(2, C, 3, 3, generator=g) - 2
    got = DiscretizedLogistic().nll(torch.cat([loc, log_scale], 1), x)
    per_pixel = _logistic_nll_per_level(loc.flatten(), log_scale.flatten(), levels.flatten())
    assert torch.allclose(got, per_pixel.view(2, -1).sum(1), rtol=1e-5)


# ------------------------------------------------------------------------------------- common

LIKELIHOODS = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "gaussian_learned": lambda: Gaussian(learn_sigma=True),
    "laplace": Laplace,
    "mse": SquaredError,
    "categorical": Categorical,
    "logistic": DiscretizedLogistic,
}


@pytest.mark.parametrize("name", LIKELIHOODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_is_per_example_float32(name, dtype):
    lik = LIKELIHOODS[name]()
    g = torch.Generator().manual_seed(14)
    out = (3 * torch.randn(B, C * lik.out_mult, H, W, generator=g)).to(dtype)
    _, x = _grid(15)
    nll = lik.nll(out, x)
    assert nll.shape == (B,) and nll.dtype == torch.float32
    assert torch.isfinite(nll).all()


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_mean_is_an_image_in_unit_interval(name):
    lik = LIKELIHOODS[name]()
    g = torch.Generator().manual_seed(16)
    out = 10 * torch.randn(B, C * lik.out_mult, H, W, generator=g)  # far outside [0, 1]
    mean = lik.mean(out)
    assert mean.shape == (B, C, H, W)
    assert mean.min() >= 0 and mean.max() <= 1

