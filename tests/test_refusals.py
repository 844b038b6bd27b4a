"""Failures a user's environment or values cause become one line naming the key or file,
before any work, instead of "unexpected <Exception>": checked in-process on the code each
command runs (the dispatcher that turns a UserError into exit 2 is end-to-end in
test_reliability)."""

import pytest
import torch
from omegaconf import OmegaConf

from vae_cli.config.components import instantiate
from vae_cli.config.schemas import validate_eval, validate_export
from vae_cli.errors import UserError
from vae_cli.runtime.files import unwritable


@pytest.fixture
def blocked(tmp_path):
    """A folder path that cannot be made: a plain file stands where its parent would be."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "out"


def test_a_folder_behind_a_file_is_unwritable_and_a_fresh_one_is_not(tmp_path, blocked):
    assert "is not a folder" in unwritable(blocked)
    assert unwritable(tmp_path / "new" / "deeper") is None


@pytest.mark.parametrize("validate", [validate_eval, validate_export])
def test_eval_and_export_refuse_an_out_dir_they_cannot_write_before_reading_anything(
        validate, blocked, tmp_path):
    cfg = OmegaConf.create({"ckpt": str(tmp_path / "none.pt"), "out_dir": str(blocked)})
    with pytest.raises(UserError, match=r"out_dir=.* cannot be written") as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_a_librarys_own_range_check_becomes_one_line_naming_the_group():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    node = OmegaConf.create({"_target_": "vae_cli.training.lr_schedules.Plateau", "factor": 2.0})
    with pytest.raises(UserError, match=r"^lr_scheduler: .*[Ff]actor") as e:
        instantiate("lr_scheduler", node, opt, epochs=2, steps_per_epoch=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("target", "key"), [
    ("vae_cli.reports.trackers.TensorBoard", "log_dir"),
    ("vae_cli.reports.trackers.WandB", "dir"),
])
def test_a_tracker_folder_that_cannot_be_written_is_refused_when_built(target, key, blocked):
    node = OmegaConf.create({"_target_": target, key: str(blocked)})
    with pytest.raises(UserError, match=f"logger.{key}=.* cannot be written"):
        instantiate("logger", node)
