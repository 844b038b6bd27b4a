"""Shared helpers of the reliability tests: the real command (in a process of its own, or
through the same dispatcher in this one), a tiny run, digests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import torch
from test_cli import TINY, vae

from vae_cli.runtime import checkpoint


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def unchanged(before: dict[str, str], folder: Path) -> bool:
    """Every file that was there is byte for byte the same (a refused start may add its own
    .hydra/again-* record beside the run's)."""
    after = digest(folder)
    return {k: after.get(k) for k in before} == before


def tiny_run(tmp: Path, name: str = "run", *extra: str) -> Path:
    vae("train", *TINY, "trainer.epochs=1", f"dataset.root={tmp / 'data'}",
        f"hydra.run.dir={tmp / name}", *extra, cwd=tmp)
    return tmp / name


def one_line_failure(proc, fragment: str, code: int = 2) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-600:])
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-600:]
    assert fragment in lines[0], lines[0]
    assert "unexpected" not in lines[0] and "Traceback" not in proc.stderr


def doctored(src: Path, dst: Path, edit) -> Path:
    """A copy of a real checkpoint whose config ``edit`` changed (as a hostile sender)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt["config"])
    ckpt.pop("format")
    dst.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(dst, ckpt)
    return dst


def dispatch(args: list[str], cwd: Path, capsys, monkeypatch) -> SimpleNamespace:
    """`vae <args>` through the real dispatcher in this process (~3 s of imports faster than
    a process of its own): its exit code and stderr, as a finished process has them."""
    from vae_cli.commands.main import main

    monkeypatch.chdir(cwd)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
