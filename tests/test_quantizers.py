"""posterior=fsq: its codes are exactly the lattice of its levels, the K = prod(levels)
indices name them one to one, gradients pass straight through the rounding to the bound,
and a model with it trains, reports its code usage and has the PixelCNN prior fitted over
its codes."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hostile import in_process

from vae_cli.errors import UserError
from vae_cli.objective.quantizers import FiniteScalar, LookupFree, ResidualVQ

LEVELS = [3, 4, 5]


def one_epoch(tmp_path, *overrides: str) -> tuple[object, dict[str, str]]:
    """A run of one epoch on 128 shapes; its folder and its metrics.csv row."""
    run = tmp_path / "run"
    in_process("train", *overrides, "dataset.n_train=128", "dataset.n_val=32",
               "dataset.n_test=32", "trainer.epochs=1", "trainer.batch_size=32",
               "trainer.num_images=4", f"dataset.root={tmp_path / 'data'}",
               f"hydra.run.dir={run}", cwd=tmp_path)
    header, row = (run / "metrics.csv").read_text().splitlines()[:2]
    return run, dict(zip(header.split(","), row.split(","), strict=True))


def fsq(levels=LEVELS, hw=(2, 2)) -> FiniteScalar:
    f = FiniteScalar(levels, latent_dim=len(levels))
    f.hw = hw
    return f


def test_every_value_is_a_lattice_point_and_every_lattice_point_is_reached():
    f = fsq()
    torch.manual_seed(0)
    q = f(torch.randn(256, 3, 2, 2) * 4)  # wide inputs reach the ends of every channel
    for d, n in enumerate(LEVELS):
        values = set(q.zq[:, d].flatten().tolist())
        lattice = {(k - n // 2) / (n // 2) for k in range(n)}
        assert values == lattice, (n, values)  # L values exactly, not L + 1
    assert f.classes == 60 and set(q.indices.flatten().tolist()) <= set(range(60))
    # the indices are a mixed-radix numbering of the lattice: one to one, both ways
    every = torch.arange(60).view(60, 1, 1).expand(60, 2, 2)
    z = f.embed(every)
    assert torch.equal(f.codes(z), every)
    points = {tuple(z[i].view(3, 4)[:, 0].tolist()) for i in range(60)}
    assert points == set(itertools.product(*[[(k - n // 2) / (n // 2) for k in range(n)]
                                             for n in LEVELS]))
    assert torch.equal(f.embed(q.indices), q.zq.flatten(1))
    assert torch.equal(f.snap(q.zq.flatten(1)), q.zq.flatten(1))


def test_the_bound_is_zero_at_zero_and_gradients_pass_straight_through():
    f = fsq()
    assert torch.equal(f.bound(torch.zeros(1, 3, 1, 1)), torch.zeros(1, 3, 1, 1))
    h = torch.randn(4, 3, 2, 2, requires_grad=True)
    q = f(h)
    z = q.draw(None, (), 0)
    assert torch.equal(z.detach(), q.zq.flatten(1))  # forward: the lattice point
    (grad,) = torch.autograd.grad(z.sum(), h)
    n = torch.tensor(LEVELS, dtype=torch.float32).view(1, 3, 1, 1)
    half_l, offset = (n - 1) * (1 + 1e-3) / 2, torch.where(n % 2 == 0, 0.5, 0.0)
    t = torch.tanh(h.detach() + torch.atanh(offset / half_l))
    expected = (1 - t ** 2) * half_l / torch.div(n, 2, rounding_mode="floor")
    assert torch.allclose(grad, expected, atol=1e-6)  # d bound / dh, rounding skipped


def test_levels_that_do_not_fit_the_latent_are_one_line():
    with pytest.raises(UserError, match="set model.latent_dim=3 or give one level"):
        FiniteScalar(LEVELS, latent_dim=8)
    with pytest.raises(UserError, match="integers >= 2"):
        FiniteScalar([4, 1], latent_dim=2)
    with pytest.raises(UserError, match="too many to index"):  # past int64 (limits=false)
        FiniteScalar([10**5] * 4, latent_dim=4)


def test_fsq_trains_reports_code_usage_and_fits_the_pixelcnn_prior(tmp_path):
    run, values = one_epoch(tmp_path, "experiment=fsq_shapes")
    assert 1 <= float(values["train_perplexity"]) <= 1000
    assert 0 < float(values["train_usage"]) <= 1
    assert float(values["val_div"]) == pytest.approx(64 * math.log(1000), rel=1e-5)
    in_process("sample", f"ckpt={run / 'checkpoints/last.pt'}", "sampler=pixelcnn",
               "sampler.epochs=1", "sampler.layers=2", "num_samples=4", "pictures=false",
               cwd=tmp_path)
    assert (run / "samples_pixelcnn_seed0.png").is_file()
    in_process("eval", f"ckpt={run / 'checkpoints/last.pt'}", "eval.iw_samples=2",
               "fd.samples=0", "eval.disentanglement.metrics=[]", cwd=tmp_path)
    assert math.isfinite(json.loads((run / "eval.json").read_text())["nll_iwae"])


def rvq(n: int = 4, dropout: bool = False) -> ResidualVQ:
    r = ResidualVQ(quantizers=n, codes=16, latent_dim=3, dropout=dropout, decay=0.8)
    r.hw = (2, 2)
    return r


def test_each_residual_stage_lowers_the_error_on_fixed_data():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 2, 2)
    r = rvq().train()
    for _ in range(30):  # the EMA codebooks fit the data and their residuals
        r(x)
    r.eval()
    q = r(x)
    codes = [stage.embed(q.indices[:, s]).view_as(x) for s, stage in enumerate(r.stages)]
    errors = [(x - sum(codes[:n])).pow(2).sum().item() for n in range(1, 5)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0], errors
    assert torch.allclose(q.zq, sum(codes))
    # the codes of the encoder's map are the stages' indices, stacked: N H x W
    assert torch.equal(r.codes(x.flatten(1)), q.indices.flatten(1, 2))
    assert torch.allclose(r.embed(r.codes(x.flatten(1))), q.zq.flatten(1))
    assert r.grid == (8, 2) and r.classes == 16


def test_quantizer_dropout_keeps_a_prefix_of_the_stages_per_example():
    torch.manual_seed(1)
    x = torch.randn(256, 3, 2, 2)
    r = rvq(dropout=True).train()
    q = r(x)
    keep = r.kept(256, x.device)  # a fresh draw, for its shape and form
    assert ((keep[:, 1:] <= keep[:, :-1]).all() and (keep[:, 0] == 1).all())
    # some examples decode fewer stages than others: their commitment terms stop early
    stages_used = (q.commit > 0).sum(1)
    assert stages_used.min() >= 1 and stages_used.max() == 4 and stages_used.float().std() > 0


def test_rvq_trains_reports_each_stages_usage_and_fits_the_pixelcnn_prior(tmp_path):
    run, values = one_epoch(tmp_path, "experiment=rvq_shapes")
    assert all(0 < float(values[f"train_usage_{s}"]) <= 1 for s in range(1, 5))
    assert float(values["val_div"]) == pytest.approx(4 * 64 * math.log(64), rel=1e-5)
    in_process("sample", f"ckpt={run / 'checkpoints/last.pt'}", "sampler=pixelcnn",
               "sampler.epochs=1", "sampler.layers=2", "num_samples=4", "pictures=false",
               cwd=tmp_path)
    assert (run / "samples_pixelcnn_seed0.png").is_file()


def test_lfqs_codes_are_the_signs_and_its_entropies_equal_a_hand_enumeration():
    lfq = LookupFree(temperature=0.5, latent_dim=2)
    lfq.hw = (1, 2)
    z = torch.tensor([[[[0.3, -0.2]], [[-0.1, 0.05]]]])  # one image, D = 2, two positions
    q = lfq(z)
    assert torch.equal(q.zq, torch.tensor([[[[1.0, -1.0]], [[-1.0, 1.0]]]]))
    assert q.indices.tolist() == [[[1, 2]]]  # bit d of the code is channel d's sign
    assert torch.equal(lfq.embed(q.indices), q.zq.flatten(1))
    assert torch.equal(lfq.codes(q.ze.flatten(1)), q.indices)
    codes = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    points = z[0].flatten(1).T  # the positions' vectors, [2, D]
    probs = torch.softmax(-torch.cdist(points, codes).pow(2) / 0.5, dim=1)  # all 4 codes
    per = -(probs * probs.log()).sum(1).mean()
    mean = probs.mean(0)
    batch = -(mean * mean.log()).sum()
    got = lfq.entropies(z)
    assert torch.allclose(got[0], per, atol=1e-6) and torch.allclose(got[1], batch, atol=1e-6)
    terms = lfq.terms(q)
    commit = (z - q.zq).pow(2).sum()
    assert torch.allclose(terms["penalty"], 0.1 * (per - batch) + 0.25 * commit, atol=1e-6)
    with pytest.raises(UserError, match="must be 1 to 16"):
        LookupFree(latent_dim=20)


def test_lfq_trains_with_its_entropy_terms_in_the_metrics(tmp_path):
    _, values = one_epoch(tmp_path, "dataset=shapes", "model=conv", "model.halvings=2",
                          "posterior=lfq", "prior=uniform", "divergence=kl",
                          "model.latent_dim=8", "trainer.pictures=false")
    assert 0 <= float(values["train_entropy"]) <= 8 * math.log(2)
    assert 0 < float(values["train_batch_entropy"]) <= 8 * math.log(2) + 1e-4
    assert float(values["val_div"]) == pytest.approx(64 * 8 * math.log(2), rel=1e-5)


def test_kmeans_initialisation_lowers_the_first_codebooks_distortion():
    from vae_cli.objective.discrete import VectorQuantizer

    torch.manual_seed(0)
    centres = torch.randn(8, 3) * 5
    x = (centres.repeat(32, 1) + 0.1 * torch.randn(256, 3)).view(256, 3, 1, 1)

    def distortion(iterations: int) -> float:
        torch.manual_seed(1)  # the same random picks before k-means
        vq = VectorQuantizer(codes=8, kmeans=iterations, latent_dim=3).train()
        vq.hw = (1, 1)
        q = vq(x)
        return (q.ze - q.zq).pow(2).sum().item()

    d = [distortion(n) for n in (0, 1, 3, 10)]
    assert d == sorted(d, reverse=True) and d[-1] < 0.5 * d[0], d  # Lloyd never worsens it
    with pytest.raises(UserError, match="needs posterior.ema=true"):
        VectorQuantizer(codes=8, kmeans=3, ema=False, latent_dim=3)
