"""loss=logistic_mixture: a proper distribution over a pixel's values (the masses of all
of them sum to 1, grey and RGB with its channel coupling), one component is loss=logistic,
and a model trains with it and reports bits per dim."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hostile import in_process

from vae_cli.errors import UserError
from vae_cli.objective.likelihoods import DiscretizedLogistic
from vae_cli.objective.logistic_mixture import LogisticMixture


def test_the_masses_of_every_value_of_a_pixel_sum_to_one():
    torch.manual_seed(0)
    grey = LogisticMixture(components=3, shape=(1, 1, 1))
    x = torch.arange(256).float().view(256, 1, 1, 1) / 255
    out = torch.randn(1, 9, 1, 1).expand(256, -1, -1, -1)
    assert torch.exp(-grey.nll(out, x)).sum().item() == pytest.approx(1.0, abs=1e-5)
    # RGB on 8 levels: all 512 colours, the green and blue means moved by red and green
    rgb = LogisticMixture(components=2, bins=8, shape=(3, 1, 1))
    colours = torch.tensor(list(itertools.product(range(8), repeat=3))).float() / 7
    out = (3 * torch.randn(1, 24, 1, 1)).expand(512, -1, -1, -1)
    assert torch.exp(-rgb.nll(out, colours.view(512, 3, 1, 1))).sum().item() == \
           pytest.approx(1.0, abs=1e-5)
    assert rgb.out_mult == 8 and grey.out_mult == 9


def test_the_coupling_moves_green_with_red_by_its_coefficient():
    rgb = LogisticMixture(components=1, shape=(3, 1, 1))
    means = torch.zeros(3, 1, 1, 1)
    coeffs = torch.tensor([0.3, 0.5, -0.2]).view(3, 1, 1, 1)
    y = torch.tensor([0.8, -0.4, 0.1]).view(3, 1, 1, 1)
    m = rgb.coupled(means, coeffs, y).flatten().tolist()
    assert m == pytest.approx([0.0, 0.5 * 0.8, -0.2 * 0.8 + 0.3 * -0.4])


def test_one_component_is_the_discretized_logistic():
    torch.manual_seed(1)
    out, x = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4)
    one = LogisticMixture(components=1, shape=(1, 4, 4))
    assert torch.allclose(one.nll(out, x), DiscretizedLogistic().nll(out[:, 1:], x))
    with pytest.raises(UserError, match="grey or RGB"):
        LogisticMixture(shape=(2, 4, 4))


def test_a_model_trains_on_it_and_reports_bits_per_dim(tmp_path):
    run = tmp_path / "run"
    in_process("train", "dataset=shapes", "model=conv", "loss=logistic_mixture",
               "loss.components=3", "dataset.n_train=128", "dataset.n_val=32",
               "dataset.n_test=32", "trainer.epochs=1", "trainer.batch_size=32",
               "trainer.pictures=false", f"dataset.root={tmp_path / 'data'}",
               f"hydra.run.dir={run}", cwd=tmp_path)
    in_process("eval", f"ckpt={run / 'checkpoints/last.pt'}", "eval.iw_samples=4",
               "fd.samples=0", "eval.disentanglement.metrics=[]", cwd=tmp_path)
    result = json.loads((run / "eval.json").read_text())
    assert 0 < result["bpd"] < 8 and math.isfinite(result["nll_iwae"])
