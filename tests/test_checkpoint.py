"""Checkpoints: atomic writes, and every foreign or hostile file refused with one line."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vae_cli.errors import UserError
from vae_cli.runtime import checkpoint
from vae_cli.runtime.run_folder import RunFolder

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "vae-cli-pwned"


class Payload:
    """Unpickling this would create MARKER: weights_only loading must never run it."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _good(tmp_path) -> Path:
    path = tmp_path / "ok.pt"
    checkpoint.save(path, {"config": {"model": {"_target_": "vae_cli.nets.mlp.build"}},
                           "model": {"w": torch.ones(2)}, "shape": [1, 4, 4]})
    return path


def test_round_trip_and_no_temp_files_left(tmp_path):
    path = _good(tmp_path)
    ckpt = checkpoint.load(path)
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ok.pt"]


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = _good(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save(path, {"config": {}, "model": {}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ok.pt"]


def test_pickle_payload_is_refused_without_running(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "config": {}, "model": Payload()}, path)
    with pytest.raises(UserError, match="not a readable vae checkpoint"):
        checkpoint.load(path)
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="not a readable vae checkpoint"):
        checkpoint.load(path)
    assert not MARKER.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, os.urandom(4096), b"PK\x03\x04junk"])
def test_junk_files_are_refused(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable vae checkpoint"):
        checkpoint.load(path)


def test_checkpoint_of_another_program_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(UserError, match="not a vae checkpoint"):
        checkpoint.load(path)


@pytest.mark.parametrize("target", ["os.system", "vae_cli.commands.compare.main"])
def test_foreign_target_in_checkpoint_config_is_refused(tmp_path, target):
    # Refused by the reader that would build from it (eval, sample, resume), before
    # anything is imported or called.
    from vae_cli.config.build import load_trained
    from vae_cli.config.schemas import validate_train

    path = tmp_path / "t.pt"
    checkpoint.save(path, {"config": {"loss": {"_target_": target}}, "model": {},
                           "shape": [1, 4, 4]})
    with pytest.raises(UserError, match="outside vae_cli"):
        load_trained(str(path), torch.device("cpu"))
    with pytest.raises(UserError, match="outside vae_cli"):
        validate_train(OmegaConf.create(checkpoint.load(path)["config"]))


def test_missing_and_unset_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="ckpt="):
        checkpoint.load(None)


def test_run_dir_of(tmp_path):
    assert RunFolder.of_checkpoint(tmp_path / "run/checkpoints/best.pt").path == tmp_path / "run"
    assert RunFolder.of_checkpoint(tmp_path / "elsewhere/x.pt").path == tmp_path / "elsewhere"
