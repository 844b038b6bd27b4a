"""`vae shard`'s arguments: shards go into OUT and nowhere else, and a refusal names the
argument the user gave."""

from __future__ import annotations

import pytest
from hostile import in_process, one_line_failure


@pytest.fixture
def photos(tmp_path):
    image = pytest.importorskip("PIL.Image")
    (tmp_path / "photos").mkdir()
    image.new("L", (8, 8)).save(tmp_path / "photos/a.png")
    return tmp_path / "photos"


@pytest.mark.parametrize("prefix", ["../../evil", "sub/x", "..", "a%d", ""])
def test_a_prefix_that_is_not_a_plain_name_is_refused(photos, tmp_path, prefix):
    proc = in_process("shard", str(photos), str(tmp_path / "deep/out"), "--prefix", prefix,
                      cwd=tmp_path, check=False)
    one_line_failure(proc, "--prefix")
    assert not list(tmp_path.rglob("*.tar"))


def test_an_out_that_is_a_file_is_named_as_such(photos, tmp_path):
    pytest.importorskip("webdataset")
    (tmp_path / "f").write_text("x")
    proc = in_process("shard", str(photos), str(tmp_path / "f"), cwd=tmp_path, check=False)
    one_line_failure(proc, f"{tmp_path / 'f'} is a file; OUT must be a folder")
    assert "hydra" not in proc.stderr
