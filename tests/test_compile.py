"""trainer.compile=true: the training step through torch.compile (inductor's C++ backend on
the CPU) takes the same steps as the eager model."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_cli import DATA

from vae_cli.config.schemas import validate_train
from vae_cli.training.recipe import fit, setup

STEPS = [*DATA, "dataset.n_train=128", "trainer.epochs=1", "model.hidden=[32]",
         "model.latent_dim=3", "trainer.image_every=5"]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_step_matches_the_eager_step(tmp_path, monkeypatch, compose_cfg):
    import torch._inductor.config as inductor

    # eager random numbers inside compiled graphs, so both draw the same posterior noise
    # (inductor's own patch: a plain setattr on its config module is not undone cleanly, and
    # torch.export in a later test of the same process then fails to read the key)
    with inductor.patch(fallback_random=True):
        for name, compiled in (("c", "true"), ("e", "false")):
            cfg = compose_cfg([*STEPS, f"dataset.root={tmp_path / 'data'}",
                               f"trainer.compile={compiled}"])
            fit(setup(validate_train(cfg), tmp_path / name))
    a, b = (torch.load(tmp_path / r / "checkpoints/last.pt", weights_only=True)
            for r in ("c", "e"))
    assert a["model"].keys() == b["model"].keys()  # no _orig_mod. prefixes in checkpoints
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
