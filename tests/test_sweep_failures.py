"""Reliability class 5: a sweep with failed jobs runs the others, then exits non-zero with
one line naming the failed jobs' logs; `vae compare` skips runs whose files it cannot read,
one line each, and compares the rest."""

from __future__ import annotations

import shutil

import pytest
from hostile import copy_run, digest, in_process, one_line_failure
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


@pytest.fixture(scope="module")
def reused(tmp_path_factory):
    """A sweep (job 1 failed), then a second sweep into its folder: job 0's folder holds the
    first sweep's run, job 1's only the failed job's records."""
    tmp = tmp_path_factory.mktemp("reused")
    sweep, base = tmp / "sweep", [*TINY, "trainer.epochs=1", "trainer.pictures=false",
                                  f"dataset.root={tmp / 'data'}"]
    in_process("train", "-m", *base, "model.latent_dim=2,-3", f"hydra.sweep.dir={sweep}",
               cwd=tmp, check=False)
    before = digest(sweep / "0")
    second = in_process("train", "-m", *base, "model.latent_dim=5,3",
                        f"hydra.sweep.dir={sweep}", cwd=tmp, check=False)
    return sweep, before, second


def test_a_job_refused_as_its_folder_holds_a_run_leaves_it_as_it_was(reused):
    sweep, before, second = reused
    one_line_failure(second, "1 of 2 sweep jobs failed", code=1)
    assert f"refused as their folders hold another run, left as they were: {sweep / '0'}" \
        in second.stderr and "train.log" not in second.stderr
    assert "another hydra.sweep.dir" in second.stderr + second.stdout
    assert "hydra.run.dir" not in second.stderr + second.stdout  # not what a sweep sets
    assert digest(sweep / "0") == before  # no FAILED, no log lines, no config record


def test_a_job_that_trains_in_a_failed_jobs_folder_clears_its_failure(reused):
    sweep, _, _ = reused
    assert (sweep / "1/checkpoints/last.pt").is_file() and not (sweep / "1/FAILED").exists()
    assert "model.latent_dim=3" in (sweep / "1/.hydra/overrides.yaml").read_text()


def test_a_sweep_of_no_jobs_is_refused(tmp_path):
    proc = in_process("train", "-m", *TINY, "model.latent_dim=range(5,1)",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=False)
    one_line_failure(proc, "the sweep has no jobs: model.latent_dim=range(5,1) sweeps no value")


def test_a_sweep_folder_that_cannot_be_made_names_hydra_sweep_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = in_process("train", "-m", *TINY, "model.latent_dim=2,3",
                      f"hydra.sweep.dir={tmp_path / 'file'}", cwd=tmp_path, check=False)
    one_line_failure(proc, "set hydra.sweep.dir elsewhere")


def test_compare_of_a_file_names_the_file_not_out(tmp_path):
    (tmp_path / "f").write_text("x")
    proc = in_process("compare", str(tmp_path / "f"), cwd=tmp_path, check=False)
    one_line_failure(proc, f"{tmp_path / 'f'} is not a folder")
    assert "--out" not in proc.stderr
