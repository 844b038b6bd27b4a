"""Reliability class 5: a sweep with failed jobs runs the others, then exits non-zero with
one line naming the failed jobs' logs; `vae compare` skips runs whose files it cannot read,
one line each, and compares the rest."""

from __future__ import annotations

import shutil

import pytest
from hostile import copy_run, one_line_failure
from test_cli import TINY, vae


def test_a_sweep_with_failed_jobs_exits_nonzero_after_running_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    proc = vae("train", "-m", *TINY, "trainer.epochs=1", f"dataset.root={tmp_path / 'data'}",
               "model.latent_dim=0,2,-1", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
               check=False)
    one_line_failure(proc, "2 of 3 sweep jobs failed", code=1)
    assert str(sweep / "0" / "train.log") in proc.stderr and str(sweep / "2") in proc.stderr
    assert (sweep / "1/checkpoints/last.pt").is_file()  # the good job ran to the end
    assert (sweep / "0/FAILED").is_file() and not (sweep / "1/FAILED").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, finished_run):
    tmp = tmp_path_factory.mktemp("compare")
    good = copy_run(finished_run, tmp / "runs/good")
    for name in ("metrics", "eval", "overrides"):  # copies, each then damaged one way
        shutil.copytree(good, tmp / "runs" / name)
    (tmp / "runs/metrics/metrics.csv").write_bytes(b"\xff\xfe\x00binary garbage\n")
    (tmp / "runs/eval/eval.json").write_text("{not json")
    (tmp / "runs/overrides/.hydra/overrides.yaml").write_text("- [unclosed\n")
    return tmp / "runs"


def test_compare_skips_unreadable_runs_and_compares_the_rest(runs, tmp_path):
    proc = vae("compare", str(runs), "--out", str(tmp_path), cwd=tmp_path)
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: skipped") for w in warnings)
    for name, file in (("metrics", "metrics.csv"), ("eval", "eval.json"),
                       ("overrides", "overrides.yaml")):
        assert any(f"{name}" in w and file in w for w in warnings), (name, warnings)
    table = (tmp_path / "compare.csv").read_text()
    assert str(runs / "good") in table and str(runs / "eval") not in table


def test_compare_refuses_an_out_that_is_a_file(runs, tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_failure(vae("compare", str(runs / "good"), "--out", str(tmp_path / "f"),
                         cwd=tmp_path, check=False), "is a file")
    one_line_failure(vae("compare", cwd=tmp_path, check=False), "vae compare --help")
