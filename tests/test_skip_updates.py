"""trainer.skip_threshold: VDVAE's rule, on a scripted sequence of gradient norms. An
update whose norm exceeds the threshold leaves the weights and the optimizer untouched and
is counted; too many in a row stop the run in one line instead of skipping forever."""

from __future__ import annotations

import pytest
import torch
from hostile import in_process
from torch import nn

from vae_cli.config.build import build_objective
from vae_cli.config.schemas import validate_train
from vae_cli.errors import UserError
from vae_cli.training.optimizers import build_optimizer
from vae_cli.training.step import SkipRule, Stepper

TINY = ["dataset.image_size=16", "model.hidden=[32]", "model.latent_dim=4"]


class Scripted(nn.Module):
    """The objective with its loss multiplied by factors[step]: gradient norms on cue."""

    def __init__(self, objective: nn.Module, factors: list[float]):
        super().__init__()
        self.objective, self.factors = objective, factors

    def forward(self, x, step, shard, y):  # noqa: ANN001, ANN201
        terms, batch = self.objective(x, step, shard, y)
        return {**terms, "loss": terms["loss"] * self.factors[step]}, batch


def test_updates_above_the_threshold_are_skipped_and_counted(compose_cfg):
    torch.manual_seed(0)
    objective = build_objective(validate_train(compose_cfg(TINY)), (1, 16, 16), 256)
    opt = build_optimizer(validate_train(compose_cfg(TINY)).optim,
                          objective.main_parameters(), compiled=False)
    factors = [1, 1e4, 1, 1e4, 1e4, 1, 1e4, 1e4, 1e4]
    rule = SkipRule(threshold=1e3, limit=3)
    step = Stepper(Scripted(objective, factors), objective, opt, torch.device("cpu"), skip=rule)
    x = torch.rand(16, 1, 16, 16).round()
    seen = []
    for i in range(8):
        before = [p.detach().clone() for p in objective.parameters()]
        terms = step(x, i)
        moved = any(not torch.equal(a, b) for a, b in zip(before, objective.parameters(),
                                                          strict=True))
        seen.append(terms["skipped"].item())
        assert moved == (terms["skipped"] == 0), i  # a skipped update changes nothing
        assert (terms["grad_norm"] > 1e3) == (factors[i] > 1), i
    assert seen == [0, 1, 0, 1, 1, 0, 1, 1]
    assert all(s["step"].item() == 3 for s in opt.state.values())  # three updates taken
    with pytest.raises(UserError, match="3 updates in a row were skipped") as e:
        step(x, 8)  # the third in a row
    assert "trainer.skip_threshold=1000" in str(e.value) and "\n" not in str(e.value)


def test_a_run_that_only_skips_stops_in_one_line_and_a_normal_one_counts_none(tmp_path):
    common = [*TINY, "dataset.n_train=256", "dataset.n_val=32", "dataset.n_test=32",
              "trainer.batch_size=32", "trainer.epochs=1", "trainer.pictures=false",
              f"dataset.root={tmp_path / 'data'}"]
    done = in_process("train", *common, "trainer.skip_threshold=1e-9", "trainer.skip_limit=5",
                      f"hydra.run.dir={tmp_path / 'stuck'}", cwd=tmp_path, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "5 updates in a row were skipped" in done.stderr
    in_process("train", *common, "trainer.skip_threshold=1e6",
               f"hydra.run.dir={tmp_path / 'fine'}", cwd=tmp_path)
    header, row = (tmp_path / "fine" / "metrics.csv").read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(values["train_skipped"]) == 0 and float(values["train_grad_norm"]) > 0
