"""Shared helpers of the reliability tests: the real command (in a process of its own, or
through the same dispatcher in this one), a tiny run, digests."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from test_cli import TINY, vae

from vae_cli.runtime import checkpoint

_MADE: dict[str, Any] = {}


def once(key: str, make: Callable[[], Any]) -> Any:
    """``make()``, called once per test process under ``key``: a run several tests read."""
    if key not in _MADE:
        _MADE[key] = make()
    return _MADE[key]


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


def in_process(*args: str, cwd: Path, check: bool = True) -> SimpleNamespace:
    """`vae <args>` through the real dispatcher in this process, for a run a test needs
    rather than checks as a process of its own (~4 s of imports faster): the exit code,
    stdout and stderr as a finished process has them. The dispatcher puts back what the
    command changed in the process (its argv, signal handlers, log handlers, a sweep's
    outcome); here, the working directory and HYDRA_FULL_ERROR."""
    from vae_cli.commands.main import main

    here = os.getcwd()
    full_error = os.environ.pop("HYDRA_FULL_ERROR", None)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(here)
        if full_error is not None:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    done = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"vae {' '.join(args)} failed ({code}):\n{done.stdout}\n"
                             f"{done.stderr}")
    return done


# What `vae train` imports before its set-up is done (its "... parameters" log line); a
# forked start finds them imported (torch._dynamo: building any torch optimizer imports it).
# What a run imports after set-up (matplotlib, torchvision for its pictures) each start
# imports itself, as a process of its own does, where a kill can land.
PRELOAD = ["torch", "torch._dynamo", "hydra", "vae_cli.commands.main",
           "vae_cli.commands.train", "hostile"]


def _forked_vae(args: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """The child's life: `python -m vae_cli <args>` but for the imports."""
    from vae_cli.commands.main import main

    os.chdir(cwd)
    os.environ.pop("HYDRA_FULL_ERROR", None)
    for fd, path in ((1, stdout), (2, stderr)):  # a file, or a terminal's device
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOCTTY), fd)
    sys.exit(main(args))


def fork(target, *args):
    """``target(*args)`` in a process of its own, forked from a server process that imported
    torch and vae_cli once (multiprocessing's forkserver, started fresh: no threads, no
    state of this one): a started multiprocessing.Process. ``target`` is a function of a
    module the server imports (PRELOAD)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    process = context.Process(target=target, args=args)
    process.start()
    return process


def write_checkpoints_forever(path: str) -> None:
    """Save checkpoints numbered 1, 2, ... to ``path`` until killed (weights: the number)."""
    i = 0
    while True:
        i += 1
        checkpoint.save(Path(path), {"config": {}, "model": {"w": torch.full((400_000,),
                                                                             float(i))},
                                     "shape": [1], "i": i})


class Forked:
    """`vae <args>` as a process of its own, forked from a server process that imported
    torch and vae_cli once (multiprocessing's forkserver, started fresh: no threads, no
    state of this one), so a test that signals or kills a start does not pay ~4 s of
    imports for it. Like subprocess.Popen for the calls the tests make: pid, poll,
    send_signal, wait, returncode (a process killed by a signal has minus its number, as
    Popen's has) and communicate, whose stdout and stderr went to files of their own
    (stderr: to the terminal device named, if one is)."""

    def __init__(self, args: list[str], cwd: Path, stderr: str | None = None) -> None:
        import tempfile
        import weakref

        folder = Path(tempfile.mkdtemp(prefix="vae-forked-"))
        weakref.finalize(self, shutil.rmtree, folder, True)
        self._out, self._err = folder / "stdout", folder / "stderr"
        self._process = fork(_forked_vae, list(args), str(cwd), str(self._out),
                             stderr or str(self._err))
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        if self.wait(timeout) is None:
            raise TimeoutError(f"vae (pid {self.pid}) still runs after {timeout} s")
        return tuple(p.read_text() if p.exists() else "" for p in (self._out, self._err))

    @classmethod
    def run(cls, *args: str, cwd: Path) -> None:
        """A start that must succeed (its output in the failure's message if not)."""
        out, err = (start := cls(list(args), cwd)).communicate()
        assert start.returncode == 0, (f"vae {' '.join(args)} exited {start.returncode}:\n"
                                       f"{out[-2000:]}\n{err[-2000:]}")


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run for a test that changes it (the run folder is found by its
    path: the copy is a run of its own)."""
    shutil.copytree(src, dst)
    return dst
