"""SIGTERM and SIGINT during training: stop between two steps, save, and say how to go on."""

from __future__ import annotations

import signal
import threading

from vae_cli.errors import UserError


class Interrupted(UserError):
    """A signal stopped training after a checkpoint was saved: exit 128 + signal."""

    def __init__(self, signum: int, step: int, path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}; saved {path}; continue with: "
                         f"vae train ckpt={path}")
        self.exit_code = 128 + signum


class StopFlag:
    """SIGTERM and SIGINT set a flag that the loop reads between steps, so the checkpoint
    is taken at a consistent point; a second SIGINT interrupts at once (atomic writes keep
    the files intact either way)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
