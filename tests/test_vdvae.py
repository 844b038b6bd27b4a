"""model=vdvae: the top-down hierarchy's log q, log p and per-layer KLs against a pass
written out by hand, the layerwise KL against its Monte Carlo estimate, the one-pass reuse
against fresh passes, the IWAE bound, refusals, and a tiny run with its pictures."""

from __future__ import annotations

import math

import pytest
import torch
from hostile import in_process
from torch.distributions import Normal

from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.nets.vdvae import resize
from vae_cli.objective.bounds import log_weights
from vae_cli.objective.topdown import LayeredPosterior, LayeredPrior

# L = 2: one layer at 2x2, one at 4x4, on 8x8 images
SMALL = ["model=vdvae", "model.width=8", "model.latent_dim=2", "model.resolutions=[2,4]",
         "model.layers=[1,1]", "model.enc_blocks=1"]


def _objective(compose, *extra, size: int = 8):
    torch.manual_seed(0)
    cfg = validate_train(compose([*SMALL, *extra]))
    objective = build_objective(cfg, (1, size, size), 100)
    with torch.no_grad():  # away from the zero-initialised prior: every term non-trivial
        for p in objective.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return objective


def _normal(params: torch.Tensor) -> Normal:
    mu, logvar = params.chunk(2, dim=1)
    return Normal(mu, torch.exp(0.5 * logvar.clamp(-30, 20)))


def _by_hand(net, enc: torch.Tensor, z: torch.Tensor):
    """The two layers' q and p at the given z, the top-down pass written out."""
    n, w = len(z), net.widths[4]
    e4, e2 = enc[:, :w * 16].view(n, w, 4, 4), enc[:, w * 16:].view(n, w, 2, 2)
    z1, z2 = z[:, :2 * 4].view(n, 2, 2, 2), z[:, 2 * 4:].view(n, 2, 4, 4)
    h = torch.zeros(n, w, 1, 1)
    out = []
    for i, (e, zl) in enumerate(((e2, z1), (e4, z2))):
        h = resize(h, e.shape[-1]) + net.bias[i]  # each resolution's learned map
        prior = net.prior[i](h)
        p = _normal(prior[:, :4])
        q = _normal(net.post[i](torch.cat([h, e], 1)))
        out.append((q, p, zl))
        h = net.blocks[i](h + prior[:, 4:] + net.proj[i](zl))
    return out, net.out(resize(h, 8))


def _kl(q: Normal, p: Normal) -> torch.Tensor:
    """KL of two diagonal Normals, the closed form written out, summed per example."""
    vq, vp = q.scale ** 2, p.scale ** 2
    kl = 0.5 * (torch.log(vp / vq) + (vq + (q.loc - p.loc) ** 2) / vp - 1)
    return kl.flatten(1).sum(1)


def test_log_q_log_p_and_each_layers_kl_match_a_pass_by_hand(compose_cfg):
    model = _objective(compose_cfg).model
    x = torch.rand(5, 1, 8, 8)
    q = model.posterior(x)
    assert isinstance(q, LayeredPosterior) and isinstance(model.prior, LayeredPrior)
    z = model.rsample(q)
    assert z.shape == (5, 2 * 4 + 2 * 16)
    layers, out = _by_hand(model.prior.net, model.encoder(x), z)
    log_q = sum(ql.log_prob(zl).flatten(1).sum(1) for ql, _, zl in layers)
    log_p = sum(pl.log_prob(zl).flatten(1).sum(1) for _, pl, zl in layers)
    torch.testing.assert_close(q.log_prob(z), log_q)
    torch.testing.assert_close(model.prior.log_prob(z), log_p)
    for found, (ql, pl, _) in zip(q.last.kl, layers, strict=True):
        torch.testing.assert_close(found, _kl(ql, pl))
    torch.testing.assert_close(model.decode(z), out)
    terms = model.family.terms(q)
    assert list(terms) == ["kl_1", "kl_2"]
    torch.testing.assert_close(terms["kl_2"], _kl(layers[1][0], layers[1][1]).mean())


def test_the_layerwise_kl_is_the_mean_of_log_q_minus_log_p(compose_cfg):
    """Sum over layers of KL(q_l || p_l) given z_<l is unbiased for KL(q || p): both
    averaged over 4000 draws agree within a few standard errors."""
    model = _objective(compose_cfg).model
    x = torch.rand(1, 1, 8, 8).expand(4000, -1, -1, -1)
    with torch.no_grad():
        q = model.posterior(x)
        z = model.rsample(q)
        mc = q.log_prob(z) - model.prior.log_prob(z)
        analytic = sum(q.last.kl)
    se = mc.std() / math.sqrt(len(mc))
    assert abs(mc.mean() - analytic.mean()) < 4 * se
    assert analytic.std() < mc.std()  # the reason to use it


def test_the_kept_pass_gives_what_fresh_passes_give(compose_cfg):
    objective = _objective(compose_cfg)
    model, net = objective.model, objective.model.prior.net
    x = torch.rand(4, 1, 8, 8)
    z = model.rsample(model.posterior(x), k=3)  # [3, 4, D], one pass of 12 rows
    flat = z.reshape(-1, z.shape[-1])
    assert net.kept(flat) is not None
    reused_p, reused_out = model.prior.log_prob(z), model.decode(flat)
    fresh = net.run(len(flat), given=flat.clone())
    torch.testing.assert_close(reused_p, sum(fresh.log_p).view(3, 4))
    torch.testing.assert_close(reused_out, fresh.out)
    assert net.kept(flat.clone()) is None  # another tensor of the same values: a new pass


def test_the_mode_and_spread_come_from_one_pass_at_the_means(compose_cfg):
    """vae eval's posterior statistics ask for both: one top-down pass, whose z is each
    layer's mean given the means above and whose scales are the spread."""
    objective = _objective(compose_cfg)
    net = objective.model.prior.net
    q = objective.model.posterior(torch.rand(4, 1, 8, 8))
    runs, run = [], net.run
    net.run = lambda *a, **kw: runs.append(1) or run(*a, **kw)
    mode, spread = q.mode_point, q.spread
    del net.run
    assert len(runs) == 1
    means = net.run(4, enc=q.enc, noise=lambda w: torch.zeros(4, w))
    torch.testing.assert_close(mode, means.z)
    torch.testing.assert_close(spread, torch.cat(means.scale, 1))


def test_training_terms_use_the_layerwise_kl_and_the_iwae_bound_tightens(compose_cfg):
    objective = _objective(compose_cfg)
    x = (torch.rand(6, 1, 8, 8) > 0.5).float()
    terms, _ = objective(x, step=0)
    torch.testing.assert_close(terms["div"], terms["kl_1"] + terms["kl_2"])
    terms["loss"].backward()
    assert all(p.grad is not None for p in objective.model.encoder.parameters())
    torch.manual_seed(1)
    with torch.no_grad():
        lw = log_weights(objective.model, x, 500)
    elbo = lw.total().mean(0)
    iwae = torch.logsumexp(lw.total(), 0) - math.log(500)
    assert (iwae >= elbo).all()
    mc = _objective(compose_cfg, "divergence.estimator=mc")
    terms, _ = mc(x, step=0)
    assert not torch.allclose(terms["div"], terms["kl_1"] + terms["kl_2"])


def test_prior_samples_narrow_with_the_temperature(compose_cfg):
    prior = _objective(compose_cfg).model.prior
    torch.manual_seed(2)
    hot, cold = prior.sample(2000), prior.sample(2000, temperature=0.1)
    assert cold[:, :8].std() < 0.2 * hot[:, :8].std()  # the top layer: p(z_1) scaled


@pytest.mark.parametrize("overrides, fragment", [
    (["prior=vamp"], "model=vdvae's prior is its own top-down layers"),
    (["posterior=planar"], "model=vdvae has Gaussian layers"),
    (["divergence=tc"], "divergence=tc needs q"),
    (["model.conditional=true"], "no conditional form"),
    (["model.resolutions=[4,2]"], "must increase"),
    (["model.resolutions=[2,16]"], "up to the image size 8"),
    (["model.layers=[1]"], "one count >= 1 for each"),
])
def test_what_vdvae_cannot_do_is_refused_in_one_line(compose_cfg, overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        build_objective(validate_train(compose_cfg([*SMALL, *overrides])), (1, 8, 8), 100,
                        num_classes=3)


def test_a_tiny_run_trains_scores_and_draws_its_layers(tmp_path):
    run = tmp_path / "run"
    in_process("train", *SMALL, "dataset=shapes", "dataset.image_size=16", "dataset.n_train=64",
               "dataset.n_val=16", "dataset.n_test=16", "trainer.epochs=1",
               "trainer.batch_size=16", f"dataset.root={tmp_path / 'data'}",
               f"hydra.run.dir={run}", cwd=tmp_path)
    assert {"layers.png", "temperatures.png"} <= {p.name for p in run.iterdir()}
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_kl_1", "train_kl_2", "val_kl_2"} <= set(header)
    in_process("eval", f"ckpt={run / 'checkpoints/best.pt'}", "eval.iw_samples=10",
               "fd.samples=0", "eval.disentanglement.metrics=[]", cwd=tmp_path)
    import json
    scores = json.loads((run / "eval.json").read_text())
    assert scores["nll_iwae"] <= scores["nelbo"] + 1e-3 and scores["bpd_iwae"] > 0
    refused = in_process("export", f"ckpt={run / 'checkpoints/best.pt'}", "format=diffusers",
                         f"out_dir={tmp_path / 'export'}", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "format=diffusers exports model=ldm runs" in \
        refused.stderr and not (tmp_path / "export").exists()


def test_the_cifar10_preset_is_vdvaes_network(compose_cfg):
    """openai/vdvae's cifar10 set: 43 stochastic layers of 16 channels, 39M parameters (the
    paper's count), the mixture of 10 logistics; one step on two images."""
    cfg = validate_train(compose_cfg(["experiment=vdvae_cifar10"]))
    objective = build_objective(cfg, (3, 32, 32), 45000)
    net = objective.model.prior.net
    assert len(net.at) == 43 and net.zdim == 16 and set(net.widths.values()) == {384}
    assert [net.at.count(r) for r in (1, 4, 8, 16, 32)] == [1, 3, 6, 11, 22]
    count = sum(p.numel() for p in objective.parameters())
    assert 38.5e6 < count < 39.5e6, count
    # VDVAE's per-dimension 200 and 400 in vae's per-image units
    assert (cfg.trainer.grad_clip, cfg.trainer.skip_threshold, cfg.trainer.ema) == \
           (200.0 * 3072, 400.0 * 3072, 0.9999)
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255
    terms, _ = objective(x, step=0)
    terms["loss"].backward()
    assert math.isfinite(terms["loss"].item()) and "kl_43" in terms


def test_the_posterior_groups_bounds_clamp_every_layers_q_and_p(compose_cfg):
    model = _objective(compose_cfg, "posterior.logvar_min=-1.0", "posterior.logvar_max=0.5").model
    q = model.posterior(torch.rand(3, 1, 8, 8))
    model.rsample(q)
    scales = torch.cat(q.last.scale, 1)
    assert scales.min() >= math.exp(-0.5) - 1e-6 and scales.max() <= math.exp(0.25) + 1e-6
    assert model.prior.net.bounds == (-1.0, 0.5)


def test_a_width_per_resolution_is_projected_where_the_state_arrives(compose_cfg):
    """Efficient-VDVAE narrows its blocks towards the image: 16 channels at 2 px, 8 at 4 px;
    a 1x1 convolution changes the width between resolutions, in both directions."""
    objective = _objective(compose_cfg, "model.width=[16,8]", "model.enc_blocks=[1,2]")
    net, encoder = objective.model.prior.net, objective.model.encoder
    assert net.widths == {2: 16, 4: 8}
    assert [tuple(m.weight.shape) for m in net.shifts if hasattr(m, "weight")] == [(8, 16, 1, 1)]
    assert [tuple(m.weight.shape) for m in encoder.shifts if hasattr(m, "weight")] == \
        [(16, 8, 1, 1)]
    assert [len(stage) for stage in encoder.stages] == [2, 1]  # 4 px, then 2 px
    x = torch.rand(3, 1, 8, 8)
    assert encoder(x).shape == (3, 8 * 16 + 16 * 4)
    terms, _ = objective(x.round(), step=0)
    terms["loss"].backward()
    z = objective.model.rsample(objective.model.posterior(x))
    fresh = net.run(3, given=z.clone())
    torch.testing.assert_close(objective.model.decode(z), fresh.out)


def test_the_binarized_mnist_preset_is_efficient_vdvaes_layout(compose_cfg):
    """egs/binarized_mnist_baseline.cfg: 23 layers of 32 channels, 5/5/10/2/1 from the top,
    blocks narrowing from 512 to 32 channels, Bernoulli pixels; one step on two images."""
    cfg = validate_train(compose_cfg(["experiment=vdvae_binarized_mnist"]))
    objective = build_objective(cfg, (1, 28, 28), 55000)
    net = objective.model.prior.net
    assert [net.at.count(r) for r in (1, 4, 7, 14, 28)] == [5, 5, 10, 2, 1]
    assert net.widths == {1: 512, 4: 256, 7: 128, 14: 64, 28: 32} and net.zdim == 32
    assert cfg.trainer.skip_threshold == 800.0 * 784 and cfg.optim._target_ == "torch.optim.Adamax"
    x = (torch.rand(2, 1, 28, 28) > 0.5).float()
    terms, _ = objective(x, step=0)
    terms["loss"].backward()
    assert math.isfinite(terms["loss"].item()) and "kl_23" in terms
