"""The disentanglement metric suite (BetaVAE, FactorVAE, MIG, SAP, DCI, modularity) on small
synthetic codes of known structure, the ground-truth oracles, and `vae eval` reporting all six.

Synthetic codes: factors on small grids; an "oracle" whose observations are the grid positions
themselves, so an encoder is any function of them (no model, no training).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vae_cli.config.schemas import DISENTANGLEMENT_METRICS, validate_eval, validate_train
from vae_cli.data.dsprites import FILENAME as DSPRITES_FILE
from vae_cli.data.dsprites import dsprites
from vae_cli.data.shapes import ShapesOracle, factor_grids, shapes
from vae_cli.errors import UserError
from vae_cli.evaluation.disentanglement.dci import dci
from vae_cli.evaluation.disentanglement.factor_vae import factor_vae
from vae_cli.evaluation.disentanglement.mig import mig
from vae_cli.evaluation.disentanglement.modularity import modularity
from vae_cli.evaluation.disentanglement.sap import sap, score_matrix
from vae_cli.evaluation.disentanglement.suite import (
    METRICS,
    SAP_LATENTS,
    Intervention,
    score,
    train_test,
)
from vae_cli.reports.comparison import build_table

SIZES = (3, 5, 8)
SMALL = {  # sizes that keep each test well under a second or two
    "metrics": list(METRICS), "test_fraction": 0.333,
    "beta_vae": {"batch_size": 16, "train_points": 200, "test_points": 150, "c": 1.0,
                 "max_iter": 100},
    "factor_vae": {"batch_size": 16, "train_points": 200, "test_points": 300,
                   "variance_points": 500, "prune_var": 0.01},
    "sap": {"c": 100.0, "max_iter": 100},
    "dci": {"alpha": 0.001, "max_iter": 1000, "tol": 1e-10},
}


class GridOracle:
    """Observations are the grid positions themselves (float), so encoders are plain maps."""

    def __init__(self, sizes=SIZES):
        self.sizes = tuple(sizes)

    def observe(self, classes: torch.Tensor) -> torch.Tensor:
        return classes.double()


def _noise(c: torch.Tensor, dims: int, seed: int) -> torch.Tensor:
    # seeded by the content, so an encoder is a fixed (if noisy) function of its input
    g = torch.Generator().manual_seed(seed + int((c * torch.arange(1, c.shape[1] + 1)).sum()))
    return torch.randn(len(c), dims, generator=g, dtype=torch.float64)


def factor_code(c: torch.Tensor, noise: float = 0.01) -> torch.Tensor:
    """The factors, permuted, rescaled and noised: a perfectly disentangled code."""
    f = c.double() / torch.tensor(SIZES, dtype=torch.float64)
    z = f[:, [2, 0, 1]] * torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64)
    return z + noise * _noise(c, 3, 1)


def random_code(c: torch.Tensor) -> torch.Tensor:
    """Ignores the factors."""
    return _noise(c, 4, 2)


def mixed_code(c: torch.Tensor) -> torch.Tensor:
    """Partly entangled with a noise latent: every score strictly between its extremes."""
    f = c.double() / torch.tensor(SIZES, dtype=torch.float64)
    z = torch.stack([f[:, 0] + 0.5 * f[:, 1], f[:, 1], f[:, 2] - 0.3 * f[:, 0],
                     torch.zeros(len(c), dtype=torch.float64)], 1)
    return z + 0.1 * _noise(c, 4, 3)


def draw(n: int, seed: int = 0, sizes=SIZES) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(s, (n,), generator=g) for s in sizes], 1)


def full_grid(repeats: int, sizes=SIZES) -> torch.Tensor:
    """Every combination equally often: independent factors with exactly uniform marginals,
    so the plug-in MI between different factors is exactly 0."""
    grid = torch.cartesian_prod(*(torch.arange(s) for s in sizes))
    return grid.repeat(repeats, 1)


def run_all(code, classes: torch.Tensor, seed: int = 0, settings=SMALL) -> dict:
    return score(code(classes), classes.float(), ["a", "b", "c"], settings, seed, 20,
                 Intervention(GridOracle(), code))


def sap_ceiling(classes: torch.Tensor, seed: int = 0) -> float:
    """SAP of a perfect code: the best latent predicts its factor exactly, the second best at
    best guesses the most frequent class of the held-out points."""
    _, test = train_test(len(classes), SMALL["test_fraction"], seed)
    return sum(1 - torch.bincount(classes[test, k]).max().item() / len(test)
               for k in range(classes.shape[1])) / classes.shape[1]


# ------------------------------------------------------------------ top and bottom

def test_a_code_of_the_factors_scores_at_the_top_and_a_random_code_at_the_bottom():
    classes = draw(1500)
    good, bad = run_all(factor_code, classes), run_all(random_code, classes)
    assert good["beta_vae"] == 1.0 and good["factor_vae"] == 1.0
    assert good["mig"] > 0.9 and good["modularity"] > 0.95
    assert good["sap"] > 0.95 * sap_ceiling(classes)
    assert good["dci_disentanglement"] > 0.98 and good["dci_completeness"] > 0.98
    assert good["dci_informativeness"] < 0.05  # held-out NRMSE: an error

    chance = 1 / len(SIZES)
    assert abs(bad["beta_vae"] - chance) < 0.12 and abs(bad["factor_vae"] - chance) < 0.12
    assert bad["mig"] < 0.02 and bad["sap"] < 0.05
    assert bad["dci_disentanglement"] < 0.3 and bad["dci_completeness"] < 0.3
    assert bad["dci_informativeness"] > 0.95
    # Modularity of pure noise is not near 0 here: the plug-in MI's upward bias is about
    # (bins - 1)(classes - 1) / 2N, so with 3, 5, 8 classes the 8-class factor dominates each
    # noise latent, and 1 - (2^2 + 4^2) / (7^2 (K - 1)) is what the reference estimator gives.
    assert bad["modularity"] == pytest.approx(1 - (2**2 + 4**2) / (7**2 * 2), abs=0.03)


def test_modularity_of_noise_is_low_when_the_factors_have_equally_many_classes():
    classes = draw(2000, sizes=(6, 6, 6))
    noise = _noise(classes, 4, 5)
    assert modularity(noise, classes.float())["modularity"] < 0.3
    unequal = draw(2000, sizes=(2, 6, 30))
    assert modularity(noise, unequal.float())["modularity"] > 0.5  # the documented bias


def test_same_seed_same_numbers_and_the_seed_matters():
    classes = draw(600)
    first, again = run_all(mixed_code, classes, seed=4), run_all(mixed_code, classes, seed=4)
    assert first == again
    other = run_all(mixed_code, classes, seed=5)
    assert other["beta_vae"] != first["beta_vae"] or other["factor_vae"] != first["factor_vae"]
    assert other["sap_settings"]["seed"] == 5


# ------------------------------------------------------------------ invariances

def test_permuting_latents_leaves_every_score_unchanged():
    classes = draw(900)
    perm = [3, 1, 0, 2]

    def permuted(c):
        return mixed_code(c)[:, perm]

    a, b = run_all(mixed_code, classes), run_all(permuted, classes)
    for key in ("beta_vae", "beta_vae_train", "factor_vae", "factor_vae_train", "sap",
                "sap_per_factor", "mig", "mig_per_factor"):
        assert a[key] == b[key], key  # counts of right answers, or per-latent values sorted
    # sums over latents in another order round differently; coordinate descent visits the
    # latents in order, so DCI's weights agree to its tolerance only
    assert a["modularity"] == pytest.approx(b["modularity"], abs=1e-12)
    for key in ("dci_disentanglement", "dci_completeness", "dci_informativeness"):
        assert a[key] == pytest.approx(b[key], abs=1e-7), key
    # and the scores are not trivially at an extreme
    assert 0.1 < a["mig"] < 0.9 and 0.1 < a["dci_disentanglement"] < 0.95


# ------------------------------------------------------------------ duplicated factors

def test_a_factor_copied_into_two_latents_has_no_gap_but_stays_modular():
    classes = draw(1500)
    f = classes.double() / torch.tensor(SIZES, dtype=torch.float64)
    one = f + 0.01 * _noise(classes, 3, 6)
    two = torch.cat([one, f[:, :1] + 0.01 * _noise(classes, 1, 7)], 1)  # factor a twice
    names = ["a", "b", "c"]
    train, test = train_test(len(classes), 0.333, 0)
    m1, m2 = mig(one, classes.float(), 20, names), mig(two, classes.float(), 20, names)
    assert m1["mig_per_factor"]["a"] > 0.9 and m2["mig_per_factor"]["a"] < 0.05
    assert m2["mig_per_factor"]["b"] == m1["mig_per_factor"]["b"]
    assert m2["mig"] == pytest.approx(m1["mig"] - m1["mig_per_factor"]["a"] / 3, abs=0.02)
    s1 = sap(one, classes.float(), train, test, names=names)
    s2 = sap(two, classes.float(), train, test, names=names)
    assert s1["sap_per_factor"]["a"] > 0.6 and abs(s2["sap_per_factor"]["a"]) < 0.03
    assert s2["sap"] == pytest.approx(s1["sap"] - s1["sap_per_factor"]["a"] / 3, abs=0.02)
    # modularity asks each latent to follow one factor, which both copies do
    mod1, mod2 = modularity(one, classes.float()), modularity(two, classes.float())
    assert mod2["modularity"] == pytest.approx(mod1["modularity"], abs=0.02)
    # whereas a latent following two factors is not: its delta is about H(a)^2 / (H(b)^2 (K -
    # 1)) = 0.24 when it determines both, which lowers the mean over 3 latents by ~0.08
    mixed = torch.cat([one[:, :1] + one[:, 1:2], one[:, 1:]], 1)
    assert modularity(mixed, classes.float())["modularity"] < mod1["modularity"] - 0.05
    # DCI: the copies share factor a's importance (less complete), each still follows a alone
    d1, d2 = dci(one, classes.float(), train, test), dci(two, classes.float(), train, test)
    assert d2["dci_completeness"] < d1["dci_completeness"] - 0.1
    assert d2["dci_disentanglement"] > 0.95


# ------------------------------------------------------------------ closed forms

def test_mig_and_modularity_of_a_one_to_one_code_on_the_full_grid_are_one():
    classes = full_grid(4)
    z = classes.double()[:, [1, 2, 0]] * torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    assert mig(z, classes.float())["mig"] == pytest.approx(1.0, abs=1e-12)
    assert modularity(z, classes.float())["modularity"] == pytest.approx(1.0, abs=1e-12)


def test_dci_of_the_identity_code_shrinks_exactly_by_the_lasso_penalty():
    # Standardised latents equal to the standardised factors: each lasso weight is 1 - alpha
    # on its own factor and exactly 0 elsewhere (cross-correlations are below alpha), so D = C
    # = 1 and each factor's held-out NRMSE is alpha times its held-out RMS (train-scaled).
    classes, alpha = draw(3000), 0.1
    train, test = train_test(len(classes), 0.333, 0)
    y = classes.double()
    d = dci(y, classes.float(), train, test, alpha=alpha, names=["a", "b", "c"])
    assert d["dci_disentanglement"] == pytest.approx(1.0, abs=1e-12)
    assert d["dci_completeness"] == pytest.approx(1.0, abs=1e-12)
    w = torch.tensor(d["dci_importance"], dtype=torch.float64)
    assert torch.allclose(w, (1 - alpha) * torch.eye(3, dtype=torch.float64), atol=1e-9)
    ys = (y - y[train].mean(0)) / y[train].std(0, unbiased=False)
    expected = (alpha * ys[test].pow(2).mean(0).sqrt()).tolist()
    assert list(d["dci_informativeness_per_factor"].values()) == pytest.approx(expected)


def test_sap_of_a_perfect_code_is_one_minus_chance():
    classes = draw(2400)
    train, test = train_test(len(classes), 0.333, 0)
    z = classes.double() * torch.tensor([1.0, -0.5, 3.0], dtype=torch.float64)
    for k, size in enumerate(SIZES):
        scores = score_matrix(z, classes[:, k], size, train, test, 100.0, 100)
        # the latent that is the factor predicts it exactly; the others, independent of it,
        # at chance
        assert scores[k] == 1.0
        assert [s for d, s in enumerate(scores) if d != k] == pytest.approx([1 / size] * 2,
                                                                            abs=0.05)
    s = sap(z, classes.float(), train, test)
    assert s["sap"] == pytest.approx(sum(1 - 1 / size for size in SIZES) / 3, abs=0.04)
    # scored on the held-out rows only: a code that is the factors on the training rows and
    # noise on the others has no gap
    leaky = z.clone()
    leaky[test] = _noise(classes[test], 3, 10)
    assert sap(leaky, classes.float(), train, test)["sap"] < 0.05


def test_sap_of_a_latent_of_thousands_of_dimensions_is_skipped_with_its_reason():
    """model=vdvae's flat latent: SAP's classifier per latent and factor would take hours."""
    classes = draw(60)
    z = torch.randn(60, SAP_LATENTS + 1, dtype=torch.float64)
    settings = {**SMALL, "metrics": ["sap", "dci"]}
    result = score(z, classes.float(), ["a", "b", "c"], settings, 0, 20)
    assert "sap" not in result and "dci_disentanglement" in result
    assert f"{SAP_LATENTS + 1} latents" in result["disentanglement_skipped"]["sap"]


def test_intervention_scores_are_one_for_a_perfect_code_and_one_over_k_for_none():
    oracle = GridOracle((4, 4, 4, 4))
    settings = {**SMALL["factor_vae"], "test_points": 600}

    def perfect(c):  # latents on very different scales: only the std scaling finds them
        scale = torch.tensor([0.2, 1.0, 10.0, 100.0], dtype=torch.float64)
        return (c.double() + 0.1 * _noise(c, 4, 9)) * scale

    def none(c):
        return _noise(c, 5, 8)

    g = torch.Generator().manual_seed(0)
    assert factor_vae(oracle, perfect, g, **settings)["factor_vae"] == 1.0
    # a code that ignores the factors: each latent votes for a factor at random
    assert factor_vae(oracle, none, g, **settings)["factor_vae"] == pytest.approx(0.25, abs=0.06)
    collapsed = factor_vae(oracle, lambda c: 0.01 * none(c), g, **settings)
    assert collapsed == {"factor_vae": 0.0, "factor_vae_train": 0.0, "factor_vae_active_dims": 0}


# ------------------------------------------------------------------ oracles

def test_the_shapes_oracle_renders_the_datasets_own_images(tmp_path):
    data = shapes(root=str(tmp_path), image_size=16, n_train=40, n_val=4, n_test=4,
                  cache=False)
    assert isinstance(data.oracle, ShapesOracle) and data.oracle.sizes == (3, 6, 40, 32, 32)
    values = data.factors["train"].double()
    classes = torch.stack([(g[None, :] - values[:, k:k + 1]).abs().argmin(1)
                           for k, g in enumerate(factor_grids())], 1)
    assert torch.equal(data.oracle.observe(classes), data.train)


def _dsprites_grid(path, sizes=(2, 2, 3, 2, 2)) -> np.ndarray:
    """A dSprites-format file over a full (small) grid, rows shuffled, each image marked with
    its row's id; returns the classes per row."""
    grid = np.array(np.meshgrid(*(np.arange(s) for s in sizes), indexing="ij"))
    grid = grid.reshape(len(sizes), -1).T
    grid = grid[np.random.default_rng(0).permutation(len(grid))]
    n = len(grid)
    classes = np.concatenate([np.zeros((n, 1), dtype=np.int64), grid], 1)
    imgs = np.zeros((n, 64, 64), dtype=np.uint8)
    imgs[:, 0, :8] = (np.arange(n)[:, None] >> np.arange(8)) & 1
    np.savez_compressed(path, imgs=imgs, latents_values=classes.astype(np.float64),
                        latents_classes=classes)
    return classes


def test_the_dsprites_oracle_looks_observations_up_by_their_factors(tmp_path):
    classes = _dsprites_grid(tmp_path / DSPRITES_FILE)
    data = dsprites(root=str(tmp_path), val_size=4, test_size=4)
    assert data.oracle.sizes == (2, 2, 3, 2, 2)
    want = torch.tensor([[1, 0, 2, 1, 0], [0, 1, 1, 0, 1], [1, 0, 2, 1, 0]])
    images = data.oracle.observe(want)
    assert images.shape == (3, 1, 64, 64) and set(images.unique().tolist()) <= {0, 255}
    rows = ((images[:, 0, 0, :8].long() // 255) << torch.arange(8)).sum(1)
    assert torch.equal(torch.from_numpy(classes[rows.numpy(), 1:]), want)
    # a file that does not hold the full grid has no oracle
    (tmp_path / "part").mkdir()
    _dsprites_grid(tmp_path / "part" / DSPRITES_FILE)
    with np.load(tmp_path / "part" / DSPRITES_FILE) as f:
        kept = {k: f[k][:-1] for k in ("imgs", "latents_values", "latents_classes")}
    np.savez_compressed(tmp_path / "part" / DSPRITES_FILE, **kept)
    assert dsprites(root=str(tmp_path / "part"), val_size=4, test_size=4).oracle is None


# ------------------------------------------------------------------ settings, compare, CLI

def test_settings_are_checked_and_name_the_key(compose_cfg):
    assert tuple(DISENTANGLEMENT_METRICS) == METRICS
    for override, key in (("eval.disentanglement.metrics=[mig,nope]", "metrics"),
                          ("eval.disentanglement.test_fraction=1.0", "test_fraction"),
                          ("eval.disentanglement.factor_vae.batch_size=1", "factor_vae"),
                          ("eval.disentanglement.beta_vae.train_points=0", "train_points"),
                          ("eval.disentanglement.dci.alpha=-1", "dci.alpha")):
        with pytest.raises(UserError, match=key):
            validate_eval(compose_cfg(["ckpt=x.pt", override], name="eval"))


def test_compare_shows_the_scores_only_where_a_run_has_them(tmp_path):
    for name, extra in (("a", {"sap": 0.5, "dci_informativeness": 0.25}), ("b", {})):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.csv").write_text("epoch,val_loss\n1,2.0\n")
        (run / "eval.json").write_text(json.dumps({"nelbo": 1.0, "mig": 0.1, **extra}))
    columns, rows = build_table([tmp_path / "a", tmp_path / "b"])
    assert columns[-2:] == ["sap", "dci_informativeness"] and "beta_vae" not in columns
    assert rows[0]["sap"] == 0.5 and "sap" not in rows[1]
    columns, _ = build_table([tmp_path / "b"])
    assert "sap" not in columns and "mig" in columns


def test_vae_eval_reports_all_six_with_their_settings(tmp_path, compose_cfg, capsys):
    from vae_cli.commands import eval as eval_command
    from vae_cli.training.recipe import save_checkpoint, setup

    # the checkpoint of a freshly initialised tiny model: what eval reads, without training
    cfg = compose_cfg([f"dataset.root={tmp_path / 'data'}", "dataset.image_size=16",
                       "dataset.n_train=64", "dataset.n_val=16", "dataset.n_test=200",
                       "model.hidden=[16]", "model.latent_dim=3", "trainer.batch_size=64",
                       "trainer.device=cpu"])
    (tmp_path / "run").mkdir()
    run = setup(validate_train(cfg), tmp_path / "run")
    save_checkpoint(run, run.folder.last)
    small = ["eval.iw_samples=2", "eval.disentanglement.beta_vae.batch_size=4",
             "eval.disentanglement.beta_vae.train_points=40",
             "eval.disentanglement.beta_vae.test_points=20",
             "eval.disentanglement.factor_vae.batch_size=4",
             "eval.disentanglement.factor_vae.train_points=40",
             "eval.disentanglement.factor_vae.test_points=20",
             "eval.disentanglement.factor_vae.variance_points=100",
             f"ckpt={tmp_path / 'run/checkpoints/last.pt'}", "device=cpu"]
    result = eval_command.run(compose_cfg(small, name="eval"))
    table = capsys.readouterr().out
    saved = json.loads((tmp_path / "run/eval.json").read_text())
    for key in ("beta_vae", "factor_vae", "mig", "sap", "dci_disentanglement",
                "dci_completeness", "dci_informativeness", "modularity"):
        assert math.isfinite(saved[key]) and f"\n{key} " in table, key
    for metric in METRICS:
        assert f"{metric}_settings" in saved and f"{metric}_settings " in table, metric
    assert saved["beta_vae_settings"]["train_points"] == 40
    assert saved["sap_settings"]["test_points"] == round(200 * 0.333)
    assert set(saved["disentanglement_estimators"]) == set(METRICS)
    assert "disentanglement_skipped" not in saved
    # the intervention scores again, alone and into another folder: the same numbers
    again = eval_command.run(compose_cfg(
        [*small, "eval.disentanglement.metrics=[beta_vae,factor_vae]",
         f"out_dir={tmp_path / 'again'}"], name="eval"))
    for key in ("beta_vae", "beta_vae_train", "factor_vae", "factor_vae_train"):
        assert again[key] == result[key], key
    assert "mig" not in again and "sap" not in again
