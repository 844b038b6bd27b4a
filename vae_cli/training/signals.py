"""SIGTERM and SIGINT: inside the training loop they stop between two steps, save, and say
how to go on; anywhere else in a command they raise ``Signalled``, which the command turns
into one line and exit 128 + n."""

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


class Signalled(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an Exception
    """SIGTERM or SIGINT outside the training loop (evaluation, pictures, between jobs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_signals() -> None:
    """SIGTERM and SIGINT raise Signalled in the main thread (a cluster's preemption and
    Ctrl-C alike), so no stage of a command dies without a word or a traceback."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Signalled(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


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
            raise Signalled(signum)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
