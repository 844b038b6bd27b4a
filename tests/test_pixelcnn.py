"""The gated PixelCNN prior over discrete codes: its causal structure (by gradients), that it
learns a known distribution of codes and samples from it in raster order, its settings, and
its saved state."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from vae_cli.config.components import instantiate
from vae_cli.config.schemas import check_sampler
from vae_cli.errors import UserError
from vae_cli.objective.discrete import GumbelSoftmax, UniformPrior, VectorQuantizer
from vae_cli.objective.priors import NormalPrior
from vae_cli.samplers.fitted import load_state
from vae_cli.samplers.pixelcnn import GatedPixelCNN, PixelCNNSampler, split

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sampler" / "pixelcnn.yaml"


class OneHotCodes(nn.Module):
    """A stand-in discrete prior: the latent vector of a grid is its codes one-hot, flattened.
    Its buffer shows whether a sampler's state takes the prior's tensors along."""

    def __init__(self, grid: tuple[int, int] = (3, 3), classes: int = 4):
        super().__init__()
        self.grid, self.classes = grid, classes
        self.latent_dim = grid[0] * grid[1] * classes
        self.register_buffer("scale", torch.ones(()))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(len(z), *self.grid, self.classes).argmax(-1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return F.one_hot(idx, self.classes).float().flatten(1) * self.scale


def raster_before(rows: int, cols: int) -> torch.Tensor:
    """[P, P] booleans: position q (column) comes strictly before p (row) in raster order."""
    order = torch.arange(rows * cols)
    return order[None, :] < order[:, None]


def receptive_field(net: GatedPixelCNN, rows: int, cols: int) -> torch.Tensor:
    """[P, P]: |d logits at p / d embedded input at q|, summed over channels; one input per
    position p in a batch, so a single backward pass gives every row."""
    gen = torch.Generator().manual_seed(0)
    p_count = rows * cols
    idx = torch.randint(net.classes, (1, rows, cols), generator=gen).expand(p_count, -1, -1)
    x = net.embed(idx).detach().double().requires_grad_()
    logits = net.double().from_embedding(x)  # [P, K, H, W]
    weights = torch.randn(p_count, net.classes, generator=gen, dtype=torch.float64)
    at_p = logits.flatten(2)[torch.arange(p_count), :, torch.arange(p_count)]  # [P, K]
    (grad,) = torch.autograd.grad((at_p * weights).sum(), x)
    return grad.abs().sum(1).flatten(1)


@pytest.mark.parametrize("kernel,layers", [(3, 6), (5, 3)])
def test_logits_see_exactly_the_codes_before_them_with_no_blind_spot(kernel, layers):
    torch.manual_seed(0)
    rows, cols = 5, 6
    net = GatedPixelCNN(7, (rows, cols), channels=16, layers=layers, kernel=kernel)
    field = receptive_field(net, rows, cols)
    before = raster_before(rows, cols)
    assert (field[~before] == 0).all()  # not the position itself, nothing after it
    # enough layers reach every earlier position: above, left, and up-right included
    assert (field[before] > 0).all()


def test_one_layer_sees_its_two_stacks_receptive_fields_and_nothing_else():
    """kernel 3, one layer: the horizontal stack reads (i, j-2) and (i, j-1); the vertical
    stack, shifted down, reads rows i-2 and i-1 at columns j-1 .. j+1 (up-right included)."""
    torch.manual_seed(0)
    rows, cols = 5, 6
    field = receptive_field(GatedPixelCNN(7, (rows, cols), channels=16, layers=1, kernel=3),
                            rows, cols)
    for i in range(rows):
        for j in range(cols):
            want = torch.zeros(rows, cols, dtype=torch.bool)
            want[i, max(j - 2, 0):j] = True
            want[max(i - 2, 0):i, max(j - 1, 0):j + 2] = True
            assert torch.equal(field[i * cols + j].view(rows, cols) > 0, want), (i, j)


def test_later_layers_add_to_the_horizontal_stack_through_a_residual():
    """With their 1x1 output convs zeroed, layers 2.. pass the horizontal stack through
    unchanged: the logits are those of the first layer alone."""
    torch.manual_seed(0)
    deep = GatedPixelCNN(5, (3, 4), channels=8, layers=3, kernel=3)
    for layer in deep.layers[1:]:
        nn.init.zeros_(layer.h_out.weight)
        nn.init.zeros_(layer.h_out.bias)
    shallow = GatedPixelCNN(5, (3, 4), channels=8, layers=1, kernel=3)
    shallow.load_state_dict({k: v for k, v in deep.state_dict().items()
                             if not k.startswith(("layers.1.", "layers.2."))})
    idx = torch.randint(5, (2, 3, 4))
    assert torch.equal(deep(idx), shallow(idx))


def test_nll_is_the_cross_entropy_summed_over_the_grid():
    torch.manual_seed(0)
    net = GatedPixelCNN(4, (2, 3), channels=8, layers=2, kernel=3)
    idx = torch.randint(4, (5, 2, 3))
    logp = net(idx).log_softmax(1).gather(1, idx[:, None]).squeeze(1)
    assert torch.allclose(net.nll(idx), -logp.sum((1, 2)))
    assert net.nll(idx).shape == (5,)


P_ROW0 = torch.tensor([0.4, 0.3, 0.2, 0.1])


def rotated_rows(n: int, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Row 0 iid from P_ROW0, every later row the row above rotated one column left: code
    (i, j) copies (i-1, j+1), up-right, which only a net with no blind spot sees, and which
    a sampler that does not go in raster order has not drawn yet."""
    first = torch.multinomial(P_ROW0, n * cols, replacement=True, generator=gen).view(n, cols)
    return torch.stack([first.roll(-i, -1) for i in range(rows)], 1)


def follows_rule(codes: torch.Tensor) -> torch.Tensor:
    """The fraction of positions below row 0 that copy their up-right neighbour."""
    return (codes[:, 1:] == codes[:, :-1].roll(-1, -1)).float().mean()


@pytest.fixture(scope="module")
def fitted():
    """A sampler fitted to rotated rows on a 3 x 3 grid, K = 4."""
    gen = torch.Generator().manual_seed(0)
    prior = OneHotCodes((3, 3), 4)
    idx = rotated_rows(3000, 3, 3, gen)
    sampler = PixelCNNSampler(channels=32, layers=2, kernel=3, epochs=6, batch_size=64,
                              lr=1e-2, val_fraction=0.1, latent_dim=prior.latent_dim,
                              prior=prior)
    sampler.fit(prior.embed(idx), torch.zeros(len(idx), prior.latent_dim))
    return sampler, prior


def test_it_learns_the_entropy_of_a_known_distribution_of_codes(fitted):
    sampler, _ = fitted
    fresh = rotated_rows(2000, 3, 3, torch.Generator().manual_seed(1))
    entropy = 3 * float(-(P_ROW0 * P_ROW0.log()).sum())  # rows 1, 2 carry no information
    assert sampler.mean_nll(fresh) == pytest.approx(entropy, abs=0.1)
    assert not sampler.training and not sampler.net.training


def test_samples_are_valid_codes_drawn_in_raster_order_at_the_set_temperature(fitted):
    sampler, prior = fitted
    torch.manual_seed(0)
    codes = prior.codes(sampler.sample(4000))
    assert codes.shape == (4000, 3, 3) and codes.min() >= 0 and codes.max() < 4
    # rows 1, 2 copy what was drawn up-right of them: each position saw its predecessors
    assert follows_rule(codes) > 0.99
    freq = torch.bincount(codes[:, 0].flatten(), minlength=4) / codes[:, 0].numel()
    assert torch.allclose(freq, P_ROW0, atol=0.03)
    # temperature 0.5 squares the probabilities (then normalises them)
    cold = PixelCNNSampler(channels=32, layers=2, kernel=3, temperature=0.5,
                           latent_dim=prior.latent_dim, prior=prior)
    cold.load_state_dict(sampler.state_dict())
    codes = prior.codes(cold.sample(4000))
    freq = torch.bincount(codes[:, 0].flatten(), minlength=4) / codes[:, 0].numel()
    assert torch.allclose(freq, P_ROW0**2 / P_ROW0.pow(2).sum(), atol=0.03)
    assert follows_rule(codes) > 0.99


def test_fit_keeps_the_best_held_out_epoch_logs_it_and_leaves_the_callers_stream(caplog):
    """Few uniform codes and a large lr overfit: held-out NLL rises after its best epoch,
    and the weights kept are that epoch's."""
    prior = OneHotCodes((2, 2), 8)
    idx = torch.randint(8, (40, 2, 2), generator=torch.Generator().manual_seed(0))
    sampler = PixelCNNSampler(channels=32, layers=2, kernel=3, epochs=15, batch_size=8,
                              lr=2e-2, val_fraction=0.5, seed=3,
                              latent_dim=prior.latent_dim, prior=prior)
    torch.manual_seed(7)
    with caplog.at_level(logging.INFO, logger="vae_cli.samplers.pixelcnn"):
        sampler.fit(prior.embed(idx), torch.zeros(len(idx), prior.latent_dim))
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))  # fork_rng: the caller's stream is untouched
    vals = [h["val"] for h in sampler.history]
    assert len(vals) == 15 and min(vals) < vals[-1]  # the last epoch is not the best
    _, held = split(len(idx), 0.5, 3)
    assert sampler.mean_nll(idx[held]) == pytest.approx(min(vals), rel=1e-5)
    lines = [r.getMessage() for r in caplog.records if "epoch" in r.getMessage()]
    assert len(lines) == 15 and all("bits/code" in line and "val" in line for line in lines)
    # the same seed gives the same fit, whatever the global stream
    again = PixelCNNSampler(channels=32, layers=2, kernel=3, epochs=15, batch_size=8,
                            lr=2e-2, val_fraction=0.5, seed=3,
                            latent_dim=prior.latent_dim, prior=prior)
    again.fit(prior.embed(idx), torch.zeros(len(idx), prior.latent_dim))
    assert all(torch.equal(a, b) for a, b in zip(sampler.state_dict().values(),
                                                  again.state_dict().values(), strict=True))


def test_a_saved_state_round_trips_into_a_fresh_sampler(tmp_path):
    prior = OneHotCodes((2, 3), 5)
    idx = torch.randint(5, (64, 2, 3), generator=torch.Generator().manual_seed(0))
    settings = {"channels": 8, "layers": 2, "kernel": 3, "epochs": 1, "batch_size": 16}
    sampler = PixelCNNSampler(**settings, latent_dim=prior.latent_dim, prior=prior)
    sampler.fit(prior.embed(idx), torch.zeros(len(idx), prior.latent_dim))
    state = sampler.state_dict()
    assert state and all(k.startswith("net.") for k in state)  # none of the prior's tensors
    path = tmp_path / "pixelcnn.pt"
    torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
    fresh = PixelCNNSampler(**settings, seed=9, latent_dim=prior.latent_dim, prior=prior)
    load_state(path, fresh, torch.load(path, weights_only=True))
    assert torch.equal(fresh.net(idx), sampler.net(idx))
    other = PixelCNNSampler(**{**settings, "channels": 16}, latent_dim=prior.latent_dim,
                            prior=prior)
    with pytest.raises(UserError, match="does not fit sampler pixelcnn"):
        load_state(path, other, torch.load(path, weights_only=True))
    assert fresh.problem() is None
    broken = {k: v.clone() for k, v in state.items()}
    broken["net.embedding.weight"][0, 0] = math.nan
    with pytest.raises(UserError, match="non-finite"):
        load_state(path, fresh, broken)


@pytest.mark.parametrize("key,value", [
    ("channels", 0), ("layers", 0), ("kernel", 4), ("kernel", 1), ("kernel", 2.0),
    ("kernel", True), ("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("lr", math.inf),
    ("lr", math.nan), ("temperature", 0.0), ("val_fraction", 1.0), ("val_fraction", -0.1),
    ("seed", -1)])
def test_bad_settings_are_refused_with_one_line(key, value):
    with pytest.raises(UserError, match=f"sampler.{key}=") as err:
        PixelCNNSampler(**{key: value}, latent_dim=36, prior=OneHotCodes())
    assert "\n" not in str(err.value)


def test_a_prior_without_a_grid_of_codes_is_refused_with_one_line():
    with pytest.raises(UserError, match="needs a discrete latent .posterior=vq") as err:
        PixelCNNSampler(latent_dim=4, prior=NormalPrior(latent_dim=4))
    assert "\n" not in str(err.value) and "NormalPrior" in str(err.value)
    flat = OneHotCodes()
    flat.grid = (9,)
    with pytest.raises(UserError, match="grid"):
        PixelCNNSampler(latent_dim=36, prior=flat)
    with pytest.raises(UserError, match="latent_dim 36"):
        PixelCNNSampler(latent_dim=35, prior=OneHotCodes())


def test_fit_refuses_a_non_finite_loss_and_too_few_grids(monkeypatch):
    prior = OneHotCodes((2, 2), 3)
    sampler = PixelCNNSampler(channels=4, layers=1, kernel=3, epochs=1,
                              latent_dim=prior.latent_dim, prior=prior)
    z = prior.embed(torch.randint(3, (8, 2, 2)))
    monkeypatch.setattr(sampler.net, "nll", lambda idx: torch.full(
        (len(idx),), math.nan, requires_grad=True))
    with pytest.raises(UserError, match="non-finite; lower sampler.lr") as err:
        sampler.fit(z, torch.zeros_like(z))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="leaves none"):
        PixelCNNSampler(val_fraction=0.5, latent_dim=prior.latent_dim, prior=prior).fit(
            z[:1], torch.zeros_like(z[:1]))


def test_the_config_file_checks_without_a_model_and_builds_with_its_defaults():
    node = OmegaConf.load(CONFIG)
    check_sampler(node)  # what `vae sample` does before any model exists: no prior
    prior = OneHotCodes()
    sampler = instantiate("sampler", node, latent_dim=prior.latent_dim, prior=prior)
    default = PixelCNNSampler(latent_dim=prior.latent_dim, prior=prior)
    assert isinstance(sampler, PixelCNNSampler)
    assert sampler.state_dict().keys() == default.state_dict().keys()
    for key, value in OmegaConf.to_container(node).items():
        if key != "_target_":
            attr = {"layers": "n_layers"}.get(key, key)
            assert getattr(default, attr) == value, key


def vq_prior() -> UniformPrior:
    """The prior a VQ-VAE model holds (as the model's builder makes it): a 2 x 3 grid of
    codes from a codebook of 6 vectors of 3 numbers."""
    torch.manual_seed(0)
    family = VectorQuantizer(codes=6, latent_dim=3)
    family.hw = (2, 3)
    prior = UniformPrior(latent_dim=3 * 2 * 3)
    prior.attach(family)
    return prior


def gumbel_prior() -> UniformPrior:
    family = GumbelSoftmax(classes=5, latent_dim=5 * 4)
    prior = UniformPrior(latent_dim=5 * 4)
    prior.attach(family)
    return prior


@pytest.mark.parametrize("make", [vq_prior, gumbel_prior])
def test_with_a_discrete_models_prior_sampled_latents_decode_to_the_sampled_codes(make):
    prior = make()
    rows, cols = prior.grid
    idx = rotated_rows(200, rows, cols, torch.Generator().manual_seed(0))
    sampler = PixelCNNSampler(channels=8, layers=2, kernel=3, epochs=2, batch_size=32,
                              latent_dim=prior.latent_dim, prior=prior)
    z = prior.embed(idx)
    sampler.fit(z, torch.zeros_like(z))
    assert all(k.startswith("net.") for k in sampler.state_dict())  # not the codebook
    torch.manual_seed(1)
    codes = sampler.net.sample(50, sampler.temperature)
    torch.manual_seed(1)
    drawn = sampler.sample(50)
    assert drawn.shape == (50, prior.latent_dim)
    assert torch.equal(prior.codes(drawn), codes)
    assert torch.equal(drawn, prior.embed(codes))
