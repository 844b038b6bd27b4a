"""Discrete latents: the vector quantiser (VQ-VAE) and Gumbel-softmax categoricals."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from cards import load_with_the_card
from omegaconf import OmegaConf
from test_cli import DATA, in_process, vae

from vae_cli.config.build import build_objective, load_trained
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.evaluation.likelihood import iwae_bound
from vae_cli.objective.discrete import (
    Categoricals,
    GumbelSoftmax,
    Quantized,
    UniformCodes,
    VectorQuantizer,
)
from vae_cli.objective.parallel import Shard

VQ = ["model=conv", "model.channels=8", "model.latent_dim=4", "posterior=vq",
      "posterior.codes=16", "prior=uniform"]


def quantizer(k: int = 6, d: int = 3, **kw) -> VectorQuantizer:
    vq = VectorQuantizer(codes=k, latent_dim=d, **kw)
    vq.hw = (2, 2)
    return vq


def test_quantisation_picks_the_nearest_code():
    torch.manual_seed(0)
    vq = quantizer(k=9, d=5).eval()
    h = torch.randn(7, 5, 2, 2)
    q = vq(h)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 5)
    brute = torch.stack([(vq.codebook - v).norm(dim=1).argmin() for v in flat])
    assert torch.equal(q.indices.flatten(), brute)
    assert torch.equal(q.zq.permute(0, 2, 3, 1).reshape(-1, 5), vq.codebook[brute])
    # codes(z) and embed() invert each other on code maps, and snap a map to its codes
    z = vq.embed(q.indices)
    assert torch.equal(vq.codes(z), q.indices) and torch.equal(vq.snap(z), z)
    assert torch.equal(vq.codes(h.flatten(1)), q.indices)


def test_straight_through_gradient_is_the_identity_on_the_encoder_side():
    torch.manual_seed(1)
    vq = quantizer().eval()
    h = torch.randn(4, 3, 2, 2, requires_grad=True)
    q = vq(h)
    z = q.draw(None, (), None)
    assert torch.allclose(z, q.zq.flatten(1))  # the forward value is the snapped map
    w = torch.randn_like(z)
    (z * w).sum().backward()
    assert torch.equal(h.grad.flatten(1), w)


def test_ema_update_matches_a_hand_computation():
    torch.manual_seed(2)
    g, eps = 0.9, 1e-3
    vq = quantizer(k=3, d=2, decay=g, epsilon=eps, restart=0.0).train()
    count0, sum0 = torch.tensor([2.0, 1.0, 0.5]), torch.randn(3, 2)
    vq.ema_count.copy_(count0)
    vq.ema_sum.copy_(sum0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    flat = torch.tensor([[0.5, 0.1], [-0.2, 0.3], [9.0, 1.0], [0.4, -0.4]])
    vq(flat.T.reshape(1, 2, 2, 2))  # positions in raster order: the rows of flat
    n = torch.tensor([3.0, 1.0, 0.0])  # three near code 0, one near code 1, none near 2
    s = torch.stack([flat[[0, 1, 3]].sum(0), flat[2], torch.zeros(2)])
    count = g * count0 + (1 - g) * n
    total = count.sum()
    smoothed = (count + eps) / (total + 3 * eps) * total
    torch.testing.assert_close(vq.ema_count, count)
    torch.testing.assert_close(vq.ema_sum, g * sum0 + (1 - g) * s)
    torch.testing.assert_close(vq.codebook, (g * sum0 + (1 - g) * s) / smoothed[:, None])


def test_dead_codes_restart_from_encoder_outputs_and_the_first_batch_initialises():
    torch.manual_seed(3)
    vq = quantizer(k=8, d=2, restart=1.0).train()
    h = torch.randn(5, 2, 2, 2) + 100.0  # far from the random initial codebook
    vq(h)
    flat = h.permute(0, 2, 3, 1).reshape(-1, 2)
    # every code was set from the batch at the first step, then averaged towards it
    assert bool(vq.started) and (vq.codebook - 100).abs().max() < 5
    vq.ema_count.copy_(torch.tensor([5.0] * 7 + [0.1]))
    vq.restart_codes(flat, vq.ema_count < 1.0)
    assert any(torch.equal(vq.codebook[7], row) for row in flat)
    assert vq.ema_count[7] == 1.0


def test_perplexity_of_uniform_usage_is_the_codebook_size_and_usage_the_fraction():
    k = 8
    vq = quantizer(k=k, d=2)
    idx = torch.arange(k).repeat(4).view(8, 2, 2)
    q = Quantized(torch.zeros(8, 2, 2, 2), torch.zeros(8, 2, 2, 2), idx)
    terms = vq.terms(q)
    assert terms["perplexity"].item() == pytest.approx(k)
    assert terms["usage"].item() == 1.0
    half = Quantized(q.ze, q.zq, idx % 4)  # four codes used evenly
    assert vq.terms(half)["perplexity"].item() == pytest.approx(4)
    assert vq.terms(half)["usage"].item() == 0.5


def test_codebook_and_commitment_terms_and_their_gradients():
    torch.manual_seed(4)
    for ema in (True, False):
        vq = quantizer(commitment=0.25, ema=ema).eval()
        h = torch.randn(3, 3, 2, 2, requires_grad=True)
        q = vq(h)
        terms = vq.terms(q)
        dist = (h - q.zq).pow(2).flatten(1).sum(1).mean()
        torch.testing.assert_close(terms["commit"], dist)
        torch.testing.assert_close(terms["codebook"], dist.detach())
        terms["penalty"].backward()
        # d/dh of beta |h - sg(e)|^2 averaged over the batch
        torch.testing.assert_close(h.grad, 0.25 * 2 * (h - q.zq).detach() / 3)
        if not ema:  # the codebook term trains the codebook itself
            assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_gumbel_softmax_samples_converge_to_the_categorical_as_the_temperature_falls():
    torch.manual_seed(5)
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().expand(40000, 1, 4)
    fam = GumbelSoftmax(classes=4, temperature=1.0, anneal_rate=0.0, latent_dim=4)
    gaps, hardness = [], []
    for tau in (2.0, 1.0, 0.3, 0.05):
        q = fam(logits.reshape(40000, 4))
        q.temperature = lambda step, tau=tau: tau

        def noise(draw, *event):
            return draw(40000, *event)

        z = q.draw(noise, (), step=1)
        gaps.append((z.mean(0) - probs).abs().max().item())
        hardness.append(z.max(-1).values.mean().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01
    assert hardness == sorted(hardness) and hardness[-1] > 0.98
    hard = q.draw(noise, (), step=None)  # outside training: exact one-hot draws
    assert torch.equal(hard.sum(-1), torch.ones(40000)) and set(hard.unique().tolist()) == {0, 1}
    assert (hard.mean(0) - probs).abs().max() < 0.01


def test_temperature_schedule_and_settings():
    fam = GumbelSoftmax(classes=3, temperature=1.0, min_temperature=0.5, anneal_rate=1e-3,
                        latent_dim=6)
    assert fam.temperature(0) == 1.0
    assert fam.temperature(100) == pytest.approx(math.exp(-0.1))
    assert fam.temperature(10**6) == 0.5
    with pytest.raises(UserError, match="multiple"):
        GumbelSoftmax(classes=4, latent_dim=6)
    with pytest.raises(UserError, match="temperature"):
        GumbelSoftmax(classes=3, temperature=0.4, min_temperature=0.5, latent_dim=6)


def test_categorical_kl_and_log_prob_in_closed_form():
    torch.manual_seed(6)
    logits = torch.randn(5, 3, 4)
    q, p = Categoricals(logits), Categoricals(torch.zeros(3, 4))
    pr = logits.softmax(-1)
    by_hand = (pr * (pr.log() + math.log(4))).sum((-1, -2))
    torch.testing.assert_close(torch.distributions.kl_divergence(q, p), by_hand)
    z = q.sample()
    idx = z.view(5, 3, 4).argmax(-1)
    torch.testing.assert_close(q.log_prob(z), pr.log().gather(-1, idx[..., None]).sum((-1, -2)))
    assert torch.allclose(p.log_prob(z), torch.full((5,), -3 * math.log(4)))
    vq = quantizer(k=6)
    qq = vq.eval()(torch.randn(5, 3, 2, 2))
    kl = torch.distributions.kl_divergence(qq, vq.uniform(12))
    assert torch.allclose(kl, torch.full((5,), 4 * math.log(6)))


def tiny_gumbel_objective(n: int = 2, k: int = 3):
    cfg = OmegaConf.create({
        "model": {"_target_": "vae_cli.nets.mlp.build", "latent_dim": n * k, "hidden": [16]},
        "posterior": {"_target_": "vae_cli.objective.discrete.GumbelSoftmax", "classes": k},
        "prior": {"_target_": "vae_cli.objective.discrete.UniformPrior"},
        "loss": {"_target_": "vae_cli.objective.likelihoods.Bernoulli"},
        "divergence": {"_target_": "vae_cli.objective.divergences.KL"},
        "schedule": {"_target_": "vae_cli.objective.schedules.Constant"},
        "trainer": {"iw_samples": 1}})
    return build_objective(cfg, (1, 3, 3), 100)


def test_gumbel_likelihood_bound_is_the_discrete_models_exact_marginal_in_the_limit():
    """N=2 variables of K=3: p(x) = sum over the 9 code pairs, by enumeration; the IWAE
    estimate with hard samples approaches it from below, the ELBO sits under both."""
    torch.manual_seed(7)
    model = tiny_gumbel_objective().model.eval()
    x = (torch.rand(6, 1, 3, 3) > 0.5).float()
    codes = torch.cartesian_prod(torch.arange(3), torch.arange(3))
    z = torch.nn.functional.one_hot(codes, 3).float().flatten(1)  # [9, 6]
    with torch.no_grad():
        log_px = torch.stack([model.log_px(z[i].expand(6, 6), x) for i in range(9)])
        exact = (torch.logsumexp(log_px, 0) - math.log(9)).mean().item()
    result = iwae_bound(model, x, 4000, batch_size=6)
    assert -result["nll_iwae"] <= exact + 1e-4
    assert -result["nll_iwae"] == pytest.approx(exact, abs=0.02)
    assert result["nelbo_iw"] >= result["nll_iwae"]


def test_rsample_under_data_parallelism_uses_the_one_process_noise():
    model = tiny_gumbel_objective().model.eval()
    x = (torch.rand(4, 1, 3, 3) > 0.5).float()
    q = model.posterior(x)
    torch.manual_seed(8)
    whole = model.rsample(q, step=5)
    parts = []
    for rank in range(2):
        torch.manual_seed(8)
        parts.append(model.rsample(model.posterior(x[2 * rank:2 * rank + 2]),
                                   shard=Shard(rank, 2), step=5))
    torch.testing.assert_close(torch.cat(parts), whole)


def test_uniform_codes_samples_are_code_maps():
    torch.manual_seed(9)
    vq = quantizer(k=5, d=3)
    p = vq.uniform(12)
    z = p.sample((7,))
    assert z.shape == (7, 12) and torch.equal(vq.snap(z), z)
    assert isinstance(p, UniformCodes) and torch.allclose(p.log_prob(z), torch.full(
        (7,), -4 * math.log(5)))


@pytest.mark.parametrize("args,match", [
    (["posterior=vq", "prior=uniform"], "model=conv or model=resnet"),
    (["model=conv", "posterior=vq"], "prior=uniform"),
    (["model=conv", "posterior=gaussian", "prior=uniform"], "discrete latent"),
    (["model=conv", "posterior=vq", "prior=uniform", "divergence=mmd"], "divergence=kl"),
    (["model.latent_dim=20", "posterior=gumbel", "prior=uniform", "trainer.iw_samples=2"],
     "iw_samples=1"),
    (["model.latent_dim=5", "posterior=gumbel", "prior=uniform"], "multiple"),
    (["model=conv", "posterior=vq", "prior=uniform", "model.conditional=true"],
     "conditional"),
    (["model=conv", "posterior=vq", "prior=uniform", "posterior.decay=1.5"], "decay"),
    (["model.latent_dim=20", "posterior=gumbel", "prior=uniform",
      "divergence.free_bits=0.5"], "free_bits=0"),
])
def test_impossible_settings_are_refused(compose_cfg_module, args, match):
    cfg = validate_train(compose_cfg_module(args))
    with pytest.raises(UserError, match=re.escape(match)):
        build_objective(cfg, (1, 16, 16), 100, num_classes=10)


def test_a_refusal_is_one_line_and_a_non_zero_exit(tmp_path):
    proc = vae("train", *DATA, "model=conv", "posterior=vq", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "prior=uniform" in proc.stderr.strip().splitlines()[-1]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_vq_run_logs_its_codebook_resumes_exactly_and_evaluates(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    # The commands through the real dispatcher in-process, but for the ONNX export's refusal:
    # its exit code and last stderr line from a process of its own.
    common = [*DATA, *VQ, "dataset.n_train=128"]
    in_process("train", *common, f"hydra.run.dir={tmp_path / 'full'}", cwd=tmp_path)
    rows = read_rows(tmp_path / "full/metrics.csv")
    for key in ("train_commit", "train_codebook", "train_perplexity", "train_usage"):
        assert key in rows[0]
    assert 1 <= float(rows[-1]["train_perplexity"]) <= 16
    assert 0 < float(rows[-1]["train_usage"]) <= 1
    # KL to the uniform prior: 4x4 map (16x16 image, two halvings) x log 16
    assert float(rows[-1]["val_div"]) == pytest.approx(16 * math.log(16), rel=1e-5)
    cut = tmp_path / "cut"
    in_process("train", *common, "trainer.epochs=1", f"hydra.run.dir={cut}", cwd=tmp_path)
    in_process("train", f"ckpt={cut / 'checkpoints/last.pt'}", "trainer.epochs=2",
               cwd=tmp_path)
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints/last.pt", weights_only=True)["model"]
    assert "family.codebook" in a and "family.ema_count" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    proc = in_process("eval", f"ckpt={tmp_path / 'full/checkpoints/last.pt'}",
                      "eval.iw_samples=50", "eval.disentanglement.metrics=[mig]",
                      "fd.samples=0", "sampler=pixelcnn", "sampler.epochs=2",
                      "sampler.channels=8", "sampler.layers=2", cwd=tmp_path)
    assert "perplexity" in proc.stdout and "nll_iwae" in proc.stdout
    result = json.loads((tmp_path / "full/eval.json").read_text())
    # the bound with the fitted PixelCNN as p(z) in place of the uniform prior (the fit is
    # saved beside the checkpoint, with the checkpoint's identity)
    assert math.isfinite(result["nll_iwae_pixelcnn"])
    assert result["nll_iwae"] == pytest.approx(result["nelbo"], rel=1e-6)  # a point mass
    assert (tmp_path / "full/samplers/pixelcnn_last.pt").is_file()
    assert (tmp_path / "full/interpolations.png").is_file()
    assert not (tmp_path / "full/traversals.png").exists()
    # exported with its codebook, loaded back by the model card's own code
    ckpt = tmp_path / "full/checkpoints/last.pt"
    in_process("export", f"ckpt={ckpt}", "format=safetensors", cwd=tmp_path)
    proc = vae("export", f"ckpt={ckpt}", "format=onnx", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "posterior=vq" in proc.stderr.strip().splitlines()[-1]
    loaded = load_with_the_card(tmp_path / "full/export/safetensors", monkeypatch)
    original = load_trained(str(ckpt), torch.device("cpu"))[0].model
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(loaded.reconstruct(x), original.reconstruct(x))
    assert torch.equal(loaded.family.codebook, original.family.codebook)


def test_gumbel_training_logs_its_annealed_temperature(tmp_path):
    run = tmp_path / "run"
    in_process("train", *DATA, "model.latent_dim=20", "model.hidden=[32]", "posterior=gumbel",
               "prior=uniform", "posterior.anneal_rate=0.05", f"hydra.run.dir={run}",
               cwd=tmp_path)
    rows = read_rows(run / "metrics.csv")
    # 8 steps per epoch: the mean of exp(-0.05 t) over steps 0..7, then 8..15 (floor 0.5)
    want = [sum(max(0.5, math.exp(-0.05 * t)) for t in range(8 * e, 8 * e + 8)) / 8
            for e in (0, 1)]
    assert [float(r["train_temperature"]) for r in rows] == pytest.approx(want, rel=1e-5)
    assert "val_temperature" not in rows[0]  # validation decodes hard samples


def test_compare_shows_codebook_use_and_the_frechet_distance_where_runs_have_them(tmp_path):
    from vae_cli.reports.comparison import build_table

    evals = {"vq": {"nelbo": 1.0, "perplexity": 40.5, "usage": 0.8,
                    "fd_shapes_features": 0.2, "fd_features": "what the score is"},
             "gauss": {"nelbo": 2.0, "fd_shapes_features": 0.3}}
    for name, e in evals.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("epoch,val_loss\n1,2.0\n")
        (tmp_path / name / "eval.json").write_text(json.dumps(e))
    columns, rows = build_table([tmp_path / "vq", tmp_path / "gauss"])
    assert columns[-3:] == ["perplexity", "usage", "fd_shapes_features"]
    assert rows[0]["perplexity"] == 40.5 and "perplexity" not in rows[1]
    assert [r["fd_shapes_features"] for r in rows] == [0.2, 0.3] and "fd_features" not in columns


def test_learned_prior_bound_of_a_vq_model_is_recon_plus_the_codes_nll(tmp_path):
    """q(z|x) is a point mass: log p(x) >= log p(x|z_q) + log p_prior(codes), exactly what
    iwae_bound gives with the fitted prior's log_prob (any k), checked term by term."""
    from vae_cli.samplers.pixelcnn import PixelCNNSampler

    torch.manual_seed(10)
    cfg = OmegaConf.create({
        "model": {"_target_": "vae_cli.nets.conv.build", "latent_dim": 3, "channels": 4},
        "posterior": {"_target_": "vae_cli.objective.discrete.VectorQuantizer", "codes": 5},
        "prior": {"_target_": "vae_cli.objective.discrete.UniformPrior"},
        "loss": {"_target_": "vae_cli.objective.likelihoods.Bernoulli"},
        "divergence": {"_target_": "vae_cli.objective.divergences.KL"},
        "schedule": {"_target_": "vae_cli.objective.schedules.Constant"},
        "trainer": {"iw_samples": 1}})
    model = build_objective(cfg, (1, 16, 16), 100).model.eval()
    x = (torch.rand(6, 1, 16, 16) > 0.5).float()
    prior = PixelCNNSampler(channels=4, layers=2, epochs=1, latent_dim=model.latent_dim,
                            prior=model.prior)
    codes = model.family.embed(torch.randint(5, (40, 4, 4)))
    prior.fit(codes, torch.zeros_like(codes))
    got = iwae_bound(model, x, 7, batch_size=6, log_prior=prior.log_prob)
    with torch.no_grad():
        q = model.posterior(x)
        zq = q.zq.flatten(1)
        want = -(model.log_px(zq, x) - prior.net.nll(q.indices)).mean().item()
    assert got["nll_iwae"] == pytest.approx(want, rel=1e-6)
    assert got["iw_samples"] == 1  # one importance sample says all for a point mass


def test_curves_show_the_codebook_and_the_temperature_not_a_constant_kl():
    from vae_cli.reports.plots import curve_panels

    vq = [{"train_loss": f"{270 - e}", "train_recon": f"{9 - e}", "train_div": "266.169",
           "val_div": "266.168", "train_commit": f"{1 + e / 10}", "train_perplexity": "14",
           "val_perplexity": f"{13 + e}", "train_usage": "1"} for e in range(3)]
    assert curve_panels(vq) == ["loss", "recon", "commit", "perplexity"]
    gumbel = [{"train_loss": "1", "train_recon": "1", "train_div": f"{e}",
               "train_temperature": f"{1 - e / 10}"} for e in range(3)]
    assert curve_panels(gumbel) == ["loss", "recon", "div", "temperature"]
