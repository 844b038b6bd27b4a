"""Every experiment preset composes to its paper's setting and runs one short epoch here on
offline stand-in data (tiny IDX files in torchvision's layout, small shapes)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from test_cli import vae
from test_data import make_mnist

from vae_cli.config.registry import config_dir
from vae_cli.config.schemas import validate_train as validate

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
SHORT = ["trainer.epochs=1", "trainer.device=cpu", "trainer.num_images=8"]
STAND_IN = {
    "mnist": ["dataset.val_size=20", "trainer.batch_size=20", "dataset.download=false"],
    "shapes": ["dataset.n_train=128", "dataset.n_val=32", "dataset.n_test=32",
               "trainer.batch_size=32", "dataset.cache=false"],
    "ptb": ["dataset.download=false", "trainer.batch_size=4"],
    "sentences": ["dataset.n_train=128", "dataset.n_val=16", "dataset.n_test=16",
                  "trainer.batch_size=32"],
}


def kind_of(name: str) -> str:
    return next((k for k in ("shapes", "ptb", "sentences") if name.endswith(k)), "mnist")


def make_ptb(root: Path) -> None:
    """Tiny files in the layout of Mikolov's PTB (leading space, <unk>, N)."""
    (root / "ptb").mkdir(parents=True)
    for split, n in (("train", 40), ("valid", 8), ("test", 8)):
        rows = [f" the <unk> company said N shares rose {i % 5} points " for i in range(n)]
        (root / "ptb" / f"ptb.{split}.txt").write_text("\n".join(rows) + "\n")


def test_presets_exist():
    assert {"vae_binarized_mnist", "iwae_binarized_mnist", "vamp_binarized_mnist",
            "wae_mmd_mnist", "beta_vae_shapes", "beta_tcvae_shapes"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_header_names_its_target(name):
    text = (config_dir() / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "Target" in text or "reports" in text


def test_presets_set_the_papers_numbers(compose_cfg):
    vamp = validate(compose_cfg(["experiment=vamp_binarized_mnist"]))
    assert (vamp.model.hidden, vamp.model.activation, vamp.model.latent_dim) == \
           ([300, 300], "gated", 40)
    assert vamp.prior.components == 500 and vamp.optim.lr == 5e-4
    assert vamp.trainer.batch_size == 100 and vamp.schedule.warmup_steps == 50000
    assert vamp.dataset.val_size == 10000 and vamp.optim._target_.endswith("NormalizedAdam")
    assert (vamp.posterior.logvar_min, vamp.posterior.logvar_max) == (-6.0, 2.0)
    iwae = validate(compose_cfg(["experiment=iwae_binarized_mnist"]))
    assert iwae.trainer.iw_samples == 50 and iwae.model.latent_dim == 50
    wae = validate(compose_cfg(["experiment=wae_mmd_mnist"]))
    assert (wae.model.latent_dim, wae.divergence.beta, wae.divergence.kernel) == (8, 10.0, "imq")
    tc = validate(compose_cfg(["experiment=beta_tcvae_shapes"]))
    assert tc.divergence._target_.endswith("TotalCorrelation") and tc.dataset.image_size == 64


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_one_short_epoch_offline(tmp_path: Path, name):
    kind = kind_of(name)
    if kind == "mnist":
        make_mnist(tmp_path / "data", n_train=80, n_test=20)
    if kind == "ptb":
        make_ptb(tmp_path / "data")
    run = tmp_path / "run"
    root = [f"dataset.root={tmp_path / 'data'}"] if kind != "sentences" else []
    vae("train", f"experiment={name}", *root, *STAND_IN[kind], *SHORT, f"hydra.run.dir={run}",
        cwd=tmp_path)
    with (run / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert math.isfinite(float(row["val_loss"]))
