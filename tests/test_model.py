"""Networks and the composed VAE: shapes, gradients, the objective's bookkeeping."""

import pytest
import torch

from vae_cli.errors import UserError
from vae_cli.nets import conv, hvae, mlp
from vae_cli.objective.bounds import Objective
from vae_cli.objective.divergences import KL
from vae_cli.objective.likelihoods import Bernoulli, Gaussian
from vae_cli.objective.model import VAE
from vae_cli.objective.posteriors import DiagonalGaussian
from vae_cli.objective.priors import NormalPrior


def _objective(builder, shape, latent=6, lik=None, beta=1.0, **kw):
    lik = lik or Bernoulli()
    nets = builder.build(latent_dim=latent, shape=shape, out_mult=lik.out_mult, **kw)
    model = VAE(nets, DiagonalGaussian(), NormalPrior(latent_dim=latent), lik, latent)
    return Objective(model, KL(beta=beta))


def _vae(builder, shape, **kw):
    return _objective(builder, shape, **kw).model


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 32, 32), (3, 32, 32), (3, 64, 64)])
def test_conv_shapes(shape):
    model = _vae(conv, shape, channels=8, fc_hidden=32)
    x = torch.rand(3, *shape)
    assert model.encoder(x).shape == (3, 12)
    assert model.decode(torch.randn(3, 6)).shape == (3, *shape)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gated"])
def test_mlp_shapes_and_gradients(activation):
    model = _objective(mlp, (1, 8, 8), hidden=[32, 16], activation=activation)
    out, _ = model(torch.rand(5, 1, 8, 8))
    out["loss"].backward()
    assert out["loss"].shape == ()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_gated_layer_is_value_times_sigmoid_gate():
    layer = mlp.Gated(3, 2)
    x = torch.randn(4, 3)
    h, g = layer.both(x).chunk(2, dim=-1)
    assert torch.allclose(layer(x), h * torch.sigmoid(g))


def test_loss_is_recon_plus_beta_times_divergence():
    torch.manual_seed(0)
    model = _objective(mlp, (1, 8, 8), beta=4.0, hidden=[16])
    out, _ = model(torch.rand(7, 1, 8, 8))
    assert torch.allclose(out["loss"], out["recon"] + 4.0 * out["div"])


def test_recon_is_summed_per_example_and_averaged_over_batch():
    """The PyTorch-VAE trap: a per-pixel mean would shrink recon by the pixel count."""
    torch.manual_seed(0)
    objective = _objective(mlp, (1, 8, 8), hidden=[16], lik=Gaussian(sigma=1.0))
    model = objective.model
    x = torch.rand(4, 1, 8, 8)
    torch.manual_seed(1)
    out, _ = objective(x)
    torch.manual_seed(1)
    q = model.posterior(x)
    mean = model.decode(q.rsample())
    per_example = 0.5 * ((x - mean) ** 2).flatten(1).sum(1) + 64 * 0.5 * torch.log(
        torch.tensor(2 * torch.pi))
    assert torch.allclose(out["recon"], per_example.mean(), rtol=1e-5)


def test_mlp_rejects_bad_options():
    with pytest.raises(UserError, match="activation"):
        mlp.build(latent_dim=2, activation="swishy", shape=(1, 4, 4))
    with pytest.raises(UserError, match="hidden"):
        mlp.build(latent_dim=2, hidden=[0], shape=(1, 4, 4))


@pytest.mark.parametrize("builder", [mlp, hvae])
def test_he_init_draws_every_linear_weight_with_variance_two_over_fan_in(builder):
    torch.manual_seed(0)
    kw = {"hidden": [300, 300]} if builder is mlp else {"hidden": 300}
    nets = {init: builder.build(latent_dim=40, activation="gated", init=init,
                                shape=(1, 28, 28), **kw) for init in ("torch", "he")}
    parts = [n for n in ("encoder", "decoder", "hierarchy") if getattr(nets["he"], n)]
    for init, factor in (("he", 2.0), ("torch", 1 / 3)):  # PyTorch: U(+-1/sqrt(fan_in))
        layers = [m for p in parts for m in getattr(nets[init], p).modules()
                  if isinstance(m, torch.nn.Linear)]
        assert len(layers) >= 6
        for m in layers:
            ratio = m.weight.var().item() * m.in_features / factor
            assert abs(ratio - 1) < 0.15, (init, m, ratio)
    with pytest.raises(UserError, match="model.init"):
        builder.build(latent_dim=4, init="glorot", shape=(1, 4, 4), **kw)


def test_conv_rejects_unsupported_sizes():
    with pytest.raises(UserError, match="square"):
        conv.build(latent_dim=2, shape=(1, 32, 28))
    with pytest.raises(UserError, match="at least"):
        conv.build(latent_dim=2, shape=(1, 7, 7))


def test_posterior_logvar_is_clamped():
    model = _vae(mlp, (1, 4, 4), hidden=[8])
    with torch.no_grad():
        model.encoder[-1].bias.fill_(1e4)
    q = model.posterior(torch.rand(2, 1, 4, 4))
    assert torch.isfinite(q.stddev).all()
