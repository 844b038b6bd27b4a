"""Evaluation: the likelihood bound, posterior diagnostics, MIG and the picture set."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchvision.io import read_image

from vae_cli.config.schemas import validate_train
from vae_cli.data.shapes import shapes
from vae_cli.evaluation.diagnostics import posterior_stats
from vae_cli.evaluation.disentanglement.mig import mig
from vae_cli.evaluation.likelihood import iwae_bound
from vae_cli.nets import Networks, mlp
from vae_cli.objective.likelihoods import Bernoulli
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import DiagonalGaussian
from vae_cli.objective.priors import MixturePrior, NormalPrior
from vae_cli.reports.pictures import write_curves, write_data_pictures
from vae_cli.training.recipe import fit, setup


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compose_cfg_module):
    """A small model really trained for a few epochs (in-process, CPU)."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = compose_cfg_module([
        f"dataset.root={tmp / 'data'}", "dataset.image_size=16", "dataset.n_train=1024",
        "dataset.n_val=128", "dataset.n_test=128", "model.hidden=[128]",
        "model.latent_dim=6", "trainer.epochs=4", "trainer.batch_size=64",
        "trainer.device=cpu", "trainer.num_images=16"])
    fit(setup(validate_train(cfg), tmp / "run"))
    from vae_cli.config.build import load_trained

    objective, _ = load_trained(str(tmp / "run/checkpoints/best.pt"), torch.device("cpu"))
    model = objective.model
    data = shapes(root=str(tmp / "data"), image_size=16, n_train=1024, n_val=128, n_test=128)
    return model, data, tmp / "run"


def test_iwae_bound_is_above_the_elbo_and_grows_with_k(trained):
    model, data, _ = trained
    x = data.test[:64]
    nll = {}
    for k in (1, 10, 100):
        torch.manual_seed(0)
        r = iwae_bound(model, x, k, batch_size=32, max_decoded=500)  # forces chunking
        assert r["nll_iwae"] <= r["nelbo_iw"] + 1e-9  # Jensen on the same samples
        nll[k] = r["nll_iwae"]
    # k = 1 is the ELBO itself; more samples tighten the bound (MC noise << the gain here)
    torch.manual_seed(0)
    one = iwae_bound(model, x, 1, batch_size=32)
    assert one["nll_iwae"] == pytest.approx(one["nelbo_iw"])
    assert nll[100] <= nll[10] + 0.05 <= nll[1] + 0.1
    assert nll[1] - nll[100] > 0.1


def test_iwae_chunking_does_not_change_the_estimate(trained):
    model, data, _ = trained
    x = data.test[:16]
    torch.manual_seed(3)
    a = iwae_bound(model, x, 40, batch_size=16, max_decoded=10_000)
    torch.manual_seed(3)
    b = iwae_bound(model, x, 40, batch_size=16, max_decoded=16 * 40)
    assert a["nll_iwae"] == pytest.approx(b["nll_iwae"], abs=1e-6)


class Half(nn.Module):
    """Encoder whose means use the input only in the first `live` dims: the rest collapse."""

    def __init__(self, d_in: int, latent: int, live: int):
        super().__init__()
        self.w = torch.randn(d_in, latent, generator=torch.Generator().manual_seed(0))
        self.w[:, live:] = 0
        self.latent = latent

    def forward(self, x):
        mu = x.flatten(1) @ self.w
        return torch.cat([mu, torch.zeros_like(mu)], dim=1)


def _collapsed_vae(prior=None):
    enc = Half(16, 5, live=2)
    dec = mlp.build(latent_dim=5, hidden=[8], shape=(1, 4, 4)).decoder
    return VAE(Networks(enc, dec), DiagonalGaussian(), prior or NormalPrior(latent_dim=5),
               Bernoulli(), 5)


def test_active_units_count_a_collapsed_dimension_as_inactive():
    model = _collapsed_vae()
    x = torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8)
    stats = posterior_stats(model, x, batch_size=64)
    assert stats["active_units"] == 2
    # Collapsed dims have q = N(0, 1) = prior: zero KL; live dims carry information.
    assert max(stats["kl_per_dim"][2:]) < 1e-6 and min(stats["kl_per_dim"][:2]) > 0.1
    assert stats["aggregate_var"][3] == pytest.approx(1.0, abs=1e-6)


def test_per_dim_kl_against_a_mixture_prior_uses_its_marginals():
    prior = MixturePrior(components=3, latent_dim=5)
    model = _collapsed_vae(prior)
    model.eval()
    x = torch.randint(0, 256, (100, 1, 4, 4), dtype=torch.uint8)
    torch.manual_seed(0)
    stats = posterior_stats(model, x, batch_size=50, mc_samples=64)
    assert all(math.isfinite(v) for v in stats["kl_per_dim"])
    # A collapsed dim has q = N(0,1); its KL to the 1-D mixture marginal is a fixed number:
    comp = prior.dist().component_distribution.base_dist
    z = torch.randn(200000, 1)
    w = torch.softmax(prior.logits, 0)
    log_p = torch.logsumexp(torch.distributions.Normal(comp.loc[:, 3], comp.scale[:, 3])
                            .log_prob(z) + w.log(), dim=1)
    expected = (torch.distributions.Normal(0, 1).log_prob(z[:, 0]) - log_p).mean().item()
    assert stats["kl_per_dim"][3] == pytest.approx(expected, abs=0.05)


def test_mig_is_one_for_a_disentangled_code_and_zero_for_a_random_one():
    g = torch.Generator().manual_seed(0)
    factors = torch.stack([torch.randint(0, 3, (4000,), generator=g),
                           torch.randint(0, 6, (4000,), generator=g),
                           torch.randint(0, 10, (4000,), generator=g)], 1).float()
    perfect = torch.cat([factors[:, [2, 0, 1]], torch.randn(4000, 2, generator=g)], 1)
    good = mig(perfect, factors, bins=20)
    assert good["mig"] > 0.95
    rand = mig(torch.randn(4000, 5, generator=g), factors, bins=20)
    assert rand["mig"] < 0.05
    # Two copies of the same factor in two dims: no gap for that factor.
    twice = torch.cat([factors[:, :1], factors[:, :1], factors[:, 1:]], 1)
    assert mig(twice, factors, names=["a", "b", "c"])["mig_per_factor"]["a"] < 0.01


def test_every_picture_is_written_with_its_grid_size(trained, tmp_path):
    model, data, run = trained
    written = write_data_pictures(model, data, "test", tmp_path, count=16)
    names = {p.name for p in written}
    assert names == {"reconstructions.png", "interpolations.png", "traversals.png",
                     "latent_scatter.png"}
    cell = 16 + 2  # image + torchvision's 2-pixel padding
    sizes = {n: tuple(read_image(str(tmp_path / n)).shape[1:]) for n in names}
    assert sizes["reconstructions.png"] == (4 * cell + 2, 8 * cell + 2)  # 2 x (inputs, recon)
    assert sizes["interpolations.png"] == (8 * cell + 2, 12 * cell + 2)  # 8 pairs, 10 + ends
    assert sizes["traversals.png"] == (6 * cell + 2, 11 * cell + 2)  # one row per latent
    assert min(sizes["latent_scatter.png"]) > 200
    curves = write_curves(run)
    assert curves is not None and read_image(str(curves)).shape[1] > 200
    for name in ("reconstructions.png", "traversals.png", "curves.png", "latent_scatter.png"):
        assert (run / name).is_file(), f"end of training wrote no {name}"


def test_eval_config_is_complete(compose_cfg):
    cfg = compose_cfg(name="eval")
    assert OmegaConf.select(cfg, "eval.iw_samples") == 1000
