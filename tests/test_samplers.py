"""Post-hoc samplers (prior, GMM, two-stage VAE), their saved fits, and the Fréchet
distance: against closed forms and known distributions, and hostile sampler files."""

from __future__ import annotations

import math

import pytest
import torch

from vae_cli.config.build import build_objective, build_sampler
from vae_cli.config.schemas import validate_sample, validate_train
from vae_cli.data.shapes import shapes
from vae_cli.errors import UserError
from vae_cli.evaluation.features import Extractor, cut_last_linear, torchvision_extractor
from vae_cli.evaluation.frechet import fd_score, frechet_distance, frechet_of
from vae_cli.samplers.fitted import FORMAT, fitted_sampler, sampler_path
from vae_cli.samplers.gmm import GaussianMixture
from vae_cli.samplers.two_stage import TwoStage


def _cov(a: float, b: float, c: float) -> torch.Tensor:
    return torch.tensor([[a, b], [b, c]], dtype=torch.float64)


def closed_form_2d(m1, c1, m2, c2) -> float:
    """FD of two 2-D Gaussians without any eigendecomposition: C1 C2 has non-negative real
    eigenvalues, and for a 2x2 matrix M with such, Tr M^{1/2} = sqrt(Tr M + 2 sqrt(det M))."""
    m = c1 @ c2
    tr_sqrt = math.sqrt(float(m.trace()) + 2 * math.sqrt(float(torch.linalg.det(m))))
    return float((m1 - m2).pow(2).sum() + c1.trace() + c2.trace()) - 2 * tr_sqrt


def draw(mean, cov, n, gen):
    return mean + torch.randn(n, len(mean), generator=gen, dtype=torch.float64) \
        @ torch.linalg.cholesky(cov).T


def test_frechet_distance_matches_the_closed_form_and_large_samples_converge_to_it():
    m1, m2 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.5, -0.5],
                                                                         dtype=torch.float64)
    c1, c2 = _cov(2.0, 0.9, 1.0), _cov(0.5, -0.3, 1.5)  # do not commute
    exact = closed_form_2d(m1, c1, m2, c2)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(exact, rel=1e-10)
    assert frechet_distance(m2, c2, m1, c1) == pytest.approx(exact, rel=1e-10)
    gen = torch.Generator().manual_seed(0)
    a, b = draw(m1, c1, 200_000, gen), draw(m2, c2, 200_000, gen)
    assert frechet_of(a, b) == pytest.approx(exact, rel=0.02)
    assert frechet_of(a, b) == pytest.approx(frechet_of(b, a), rel=1e-9)  # symmetric
    assert frechet_of(a, a) == pytest.approx(0.0, abs=1e-8)  # identical sets
    # commuting (diagonal) covariances in 5-D: sum of (sqrt(a) - sqrt(b))^2 plus the means
    va, vb = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    want = 1.0 + float((va.sqrt() - vb.sqrt()).pow(2).sum())
    got = frechet_distance(torch.zeros(5), torch.diag(va), torch.eye(5)[0], torch.diag(vb))
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_of_rank_deficient_features_is_finite():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 64, generator=gen), torch.randn(12, 64, generator=gen)  # n << d
    assert math.isfinite(frechet_of(a, b)) and frechet_of(a, b) > 0


def mixture_2d(n: int, gen: torch.Generator):
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[0.0, 0.0], [6.0, 1.0], [-3.0, 7.0]])
    covs = torch.stack([_cov(1.0, 0.5, 1.0), _cov(0.3, 0.0, 2.0), _cov(1.5, -0.8, 1.0)]).float()
    k = torch.multinomial(weights, n, replacement=True, generator=gen)
    eps = torch.randn(n, 2, generator=gen)
    x = means[k] + (torch.linalg.cholesky(covs)[k] @ eps.unsqueeze(-1)).squeeze(-1)
    return x, weights, means, covs


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gmm_em_recovers_a_known_mixture(covariance):
    x, weights, means, covs = mixture_2d(3000, torch.Generator().manual_seed(0))
    gmm = GaussianMixture(components=3, covariance=covariance, seed=0, latent_dim=2)
    gmm.fit(x, torch.ones_like(x))
    match = torch.cdist(means, gmm.means).argmin(1)  # each true component's fitted one
    assert sorted(match.tolist()) == [0, 1, 2]
    assert torch.allclose(gmm.means[match], means, atol=0.15)
    assert torch.allclose(gmm.weights[match], weights, atol=0.03)
    if covariance == "full":
        fitted = gmm.scale @ gmm.scale.transpose(1, 2)
        assert torch.allclose(fitted[match], covs, atol=0.2)
    else:
        assert torch.allclose(gmm.scale[match].pow(2), covs.diagonal(dim1=1, dim2=2), atol=0.2)
    again = GaussianMixture(components=3, covariance=covariance, seed=0, latent_dim=2)
    again.fit(x, torch.ones_like(x))
    assert torch.equal(again.means, gmm.means)  # seeded
    torch.manual_seed(0)
    z = gmm.sample(4000)
    assert torch.allclose(z.mean(0), x.mean(0), atol=0.25)


def test_two_stage_samples_match_the_moments_of_the_codes():
    # shifted, unequal scales, one correlated pair: what a standard normal prior is not; a
    # decoder ignoring u would still get the means and variances, not the correlation
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([2.0, -1.0, 0.5])
    cov = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.25]])
    codes = draw(mean.double(), cov.double(), 2000, gen).float()
    two = TwoStage(hidden=[32, 32], steps=500, batch_size=128, lr=3e-3, codes="mean",
                   latent_dim=3)
    two.fit(codes, torch.zeros_like(codes))
    torch.manual_seed(0)
    z = two.sample(4000)
    c = torch.cov(z.T)
    assert torch.allclose(z.mean(0), mean, atol=0.1)
    assert torch.allclose(c.diagonal().sqrt(), cov.diagonal().sqrt(), rtol=0.1)
    assert float(c[0, 1] / (c[0, 0] * c[1, 1]).sqrt()) == pytest.approx(0.5, abs=0.1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, compose_cfg_module):
    """An untrained tiny model, its data and a checkpoint file to identify it by: what the
    sampler's file keeping needs, without a training."""
    tmp = tmp_path_factory.mktemp("samplers")
    cfg = validate_train(compose_cfg_module(["model.hidden=[16]", "model.latent_dim=2"]))
    data = shapes(root=str(tmp / "data"), image_size=16, n_train=128, n_val=8, n_test=32)
    model = build_objective(cfg, data.shape, len(data.train)).model.eval()
    ckpt = tmp / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state": {"epoch": 1, "step": 4}}, ckpt)
    return model, data, ckpt, tmp / "run"


def _sampler(compose, model, *overrides):
    cfg = validate_sample(compose(["ckpt=x", "sampler=gmm", "sampler.components=2",
                                   *overrides], name="sample"))
    return build_sampler(cfg.sampler, model)


def test_a_fitted_sampler_is_reused_and_refitted_when_its_checkpoint_or_settings_change(
        compose_cfg, tiny):
    model, data, ckpt, run = tiny
    fit = lambda s: fitted_sampler(*s, model, data, ckpt, {"state": {"epoch": 1}}, run)  # noqa: E731
    first = _sampler(compose_cfg, model)
    assert fit(first) == "fitted" and sampler_path(run, first[0], ckpt).is_file()
    again = _sampler(compose_cfg, model)
    assert fit(again) == "reused"
    assert torch.equal(again[0].means, first[0].means)
    assert fit(_sampler(compose_cfg, model, "sampler.seed=1")) == "fitted"  # settings
    assert fit(_sampler(compose_cfg, model, "sampler.seed=1")) == "reused"
    torch.save({"state": {"epoch": 2, "step": 8}}, ckpt)  # the checkpoint changed
    assert fit(_sampler(compose_cfg, model, "sampler.seed=1")) == "fitted"
    saved = torch.load(sampler_path(run, first[0], ckpt), weights_only=True)
    assert saved["checkpoint"]["path"] == str(ckpt.resolve())
    assert saved["settings"]["seed"] == 1 == saved["seed"] and saved["codes"] == 128


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def _tamper(path, how):
    saved = torch.load(path, weights_only=True)
    if how == "bytes":
        path.write_bytes(b"\x80\x02garbage" * 10)
    elif how == "code":
        torch.save({**saved, "state": Payload()}, path)
    elif how == "marker":
        torch.save({**saved, "format": "something else"}, path)
    elif how == "shape":
        torch.save({**saved, "state": {**saved["state"], "means": torch.zeros(5, 2)}}, path)
    elif how == "weights":
        torch.save({**saved, "state": {**saved["state"], "weights": torch.tensor([3.0, 1])}},
                   path)
    elif how == "nan":
        means = saved["state"]["means"].clone()
        means[0, 0] = float("nan")
        torch.save({**saved, "state": {**saved["state"], "means": means}}, path)


@pytest.mark.parametrize("how", ["bytes", "code", "marker", "shape", "weights", "nan"])
def test_a_tampered_sampler_file_is_refused_with_one_line(compose_cfg, tiny, how, tmp_path,
                                                          capsys):
    model, data, ckpt, _ = tiny
    run = tmp_path / "run"
    sampler, settings = _sampler(compose_cfg, model)
    fitted_sampler(sampler, settings, model, data, ckpt, {}, run)
    path = sampler_path(run, sampler, ckpt)
    _tamper(path, how)
    fresh, settings = _sampler(compose_cfg, model)
    with pytest.raises(UserError) as e:
        fitted_sampler(fresh, settings, model, data, ckpt, {}, run)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "delete it to refit" in message
    assert "pwned" not in capsys.readouterr().out
    assert path.exists()  # refused, not silently overwritten
    assert FORMAT  # the marker a genuine file carries


def test_sampler_settings_are_checked_before_any_work(compose_cfg):
    for args, key in [(["sampler=gmm", "sampler.components=0"], "sampler.components"),
                      (["sampler=gmm", "sampler.covariance=spherical"], "sampler.covariance"),
                      (["sampler=gmm", "+sampler.bogus=1"], "sampler.bogus"),
                      (["sampler=two_stage", "sampler.steps=-1"], "sampler.steps"),
                      (["sampler=two_stage", "sampler.codes=mode"], "sampler.codes"),
                      (["sampler._target_=os.system"], "sampler._target_"),
                      (["fd.samples=-1"], "fd.samples"),
                      (["fd.model=resnet18"], "fd.model")]:
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            validate_sample(compose_cfg(["ckpt=x", *args], name="sample"))


def test_fd_score_is_small_for_the_data_itself_and_large_for_blank_images(tiny):
    model, data, _, _ = tiny

    class Real:  # a "sampler" whose draws decode to real images (generate: identity)
        name = "real"

        def sample(self, n):
            return data.test[torch.randint(len(data.test), (n,))].float() / 255

    class Identity:
        conditional = False

        def generate(self, z, y=None):
            return z

    ext = Extractor(lambda x: torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1),
                    "fd_test_features", "test")
    same = fd_score(Identity(), Real(), data.test, ext, 2000)
    blank = Real()
    blank.sample = lambda n: torch.zeros(n, *data.shape)
    far = fd_score(Identity(), blank, data.test, ext, 2000)
    assert same["fd_test_features"] < 0.05 * far["fd_test_features"]
    assert same["fd_sampler"] == "real" and same["fd_real"] == len(data.test)


def test_a_torchvision_extractor_uses_the_penultimate_layer_of_the_given_weights(tmp_path):
    import torchvision

    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    ext = torchvision_extractor("mobilenet_v3_small", str(tmp_path / "w.pt"), 32,
                                torch.device("cpu"))
    assert ext.key == "fd_mobilenet_v3_small_features"
    assert ext.features(torch.rand(3, 1, 16, 16)).shape == (3, 1024)  # classifier's input
    cut = torchvision.models.get_model("resnet18", weights=None)
    cut_last_linear(cut)
    assert isinstance(cut.fc, torch.nn.Identity)
    torch.save({"model": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not a readable weights file"):
        torchvision_extractor("resnet18", str(tmp_path / "bad.pt"), 32, torch.device("cpu"))
    with pytest.raises(UserError, match="not a torchvision classification model"):
        torchvision_extractor("os.system", str(tmp_path / "w.pt"), 32, torch.device("cpu"))


def test_a_fitted_density_stands_for_p_z_in_the_likelihood_bound(tiny):
    """iwae_bound(log_prior=...) puts that density in every importance weight: the model's
    own prior reproduces the default bound, a prior 1 nat less likely everywhere costs
    exactly 1 nat, and the GMM's log_prob is its mixture's density."""
    from vae_cli.evaluation.likelihood import iwae_bound

    model, data, _, _ = tiny
    x = data.test[:16]
    runs = {}
    for name, log_prior in (("default", None), ("same", model.prior.log_prob),
                            ("shifted", lambda z: model.prior.log_prob(z) - 1.0)):
        torch.manual_seed(0)
        runs[name] = iwae_bound(model, x, 8, batch_size=16, log_prior=log_prior)["nll_iwae"]
    assert runs["same"] == runs["default"]
    assert runs["shifted"] == pytest.approx(runs["default"] + 1.0, abs=1e-6)
    x2, _, _, _ = mixture_2d(500, torch.Generator().manual_seed(1))
    gmm = GaussianMixture(components=3, seed=0, latent_dim=2)
    gmm.fit(x2, torch.ones_like(x2))
    z = torch.randn(5, 2)
    comps = [torch.distributions.MultivariateNormal(gmm.means[j], scale_tril=gmm.scale[j])
             for j in range(3)]
    by_hand = torch.logsumexp(torch.stack([c.log_prob(z.double()) + gmm.weights[j].log()
                                           for j, c in enumerate(comps)]), 0)
    torch.testing.assert_close(gmm.log_prob(z), by_hand.float())
    assert gmm.density and not TwoStage(latent_dim=2).density
