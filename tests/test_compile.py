"""trainer.compile=true: the training step through torch.compile (inductor's C++ backend on
the CPU) takes the same steps as the eager model."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from test_cli import DATA

from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.runtime.run_folder import read_metrics
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


CONV = [*DATA, "model=conv", "model.channels=8", "model.max_channels=16", "model.fc_hidden=32",
        "model.latent_dim=4", "trainer.epochs=3", "trainer.image_every=5"]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_a_compiled_conv_run_learns_like_the_eager_run(tmp_path, compose_cfg):
    """Not step-for-step (inductor draws its own posterior noise): the whole loss curve. A
    compiled model whose updates were wrong (the failure seen with compiled convolutions on
    a GPU: val loss 792 against 190 eager) would not fall like the eager one."""
    curves = {}
    for compiled in ("true", "false"):
        cfg = compose_cfg([*CONV, f"dataset.root={tmp_path / 'data'}",
                           f"trainer.compile={compiled}"])
        fit(setup(validate_train(cfg), tmp_path / compiled))
        rows = read_metrics(tmp_path / compiled / "metrics.csv")
        curves[compiled] = [float(r["val_loss"]) for r in rows]
    eager, compiled = curves["false"], curves["true"]
    assert eager[-1] < 0.9 * eager[0]  # the check has something to compare: learning
    for a, b in zip(compiled, eager, strict=True):
        assert abs(a - b) < 0.02 * b, (compiled, eager)


def test_compiled_convolutions_on_cuda_are_refused_in_one_line(monkeypatch):
    from vae_cli.errors import UserError
    from vae_cli.nets import conv, mlp
    from vae_cli.training.recipe import check_compilable

    def objective(builder, **kw):
        return torch.nn.ModuleList([builder.build(latent_dim=2, shape=(1, 16, 16), **kw)
                                    .decoder])
    cuda, convs = torch.device("cuda"), objective(conv, channels=4)
    with pytest.raises(UserError, match=re.escape(f"torch {torch.__version__}")):
        check_compilable(convs, cuda)
    check_compilable(objective(mlp, hidden=[4]), cuda)  # an MLP compiles on CUDA
    check_compilable(convs, torch.device("cpu"))  # and convolutions on the CPU
    monkeypatch.setenv("VAE_COMPILE_CONV_CUDA", "1")
    check_compilable(convs, cuda)  # the way to check whether a torch release fixed it


def test_a_failed_compile_is_one_line_naming_trainer_compile_false(tmp_path, compose_cfg):
    """torch.compile failing on the user's machine (here: no working C++ compiler, as on a
    machine without one) ends in one line with its reason and the way round it."""
    import torch._dynamo
    import torch._inductor.config as inductor

    cfg = validate_train(compose_cfg([*STEPS, f"dataset.root={tmp_path / 'data'}",
                                      "trainer.compile=true"]))
    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++")),
                         "fx_graph_cache": False}), \
            pytest.raises(UserError, match=r"^trainer.compile=true: torch.compile failed "
                          r"\(.*C\+\+ compiler.*\); trainer.compile=false trains without it"):
        fit(setup(cfg, tmp_path / "run"))
    torch._dynamo.reset()
