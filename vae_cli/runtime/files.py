"""Atomic files: a reader sees the old content or the new, never half of it."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from vae_cli.errors import UserError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The process's umask, read once: every file a run writes gets the mode the user's umask
# gives a new file.
UMASK = _umask()


@contextmanager
def atomic_write(path: str | Path, make_parents: bool = True) -> Iterator[BinaryIO]:
    """A binary handle whose content becomes ``path`` only once complete: a temp file in the
    same folder, fsync, os.replace. A writer killed at any moment leaves the previous file
    intact (and at most a ``.<name>.*.tmp`` file, never read). ``make_parents=False``: a
    missing folder is an error, not something to recreate."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _full(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would differ from every other file
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _full(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _full(e: OSError, path: Path) -> Exception:
    """A full disk (or quota) as one line; the previous file at ``path`` is intact."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"the disk is full writing {path}; the previous file is kept "
                         "(free space, then resume)")
    return e


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a folder held while the block runs: a second process asking for
    it is refused at once. flock on the folder itself, so nothing is written into it, and
    the operating system releases it when the holder exits, however it exits."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder} is in use by another vae train; choose another "
                            "hydra.run.dir") from None
        HELD.add(fd)
        yield
    finally:
        HELD.discard(fd)
        os.close(fd)


# The folder locks this process holds: a forked child (a DataLoader worker) closes its
# copies, or a holder killed with SIGKILL would leave its lock to its orphaned children.
HELD: set[int] = set()


def forget_locks() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its lock)."""
    for fd in list(HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD.clear()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text.encode())
    return Path(path)


def save_cache(path: Path, payload: dict, what: str, consequence: str) -> bool:
    """torch.save ``payload`` atomically; a folder that cannot be written only costs the
    cache (a warning naming ``what`` and its ``consequence``). True when written."""
    import torch  # not at the top: the CLI's fast paths import this module without torch

    try:
        with atomic_write(path) as f:
            torch.save(payload, f)
    except (OSError, UserError) as e:
        logging.getLogger(__name__).warning("could not save %s to %s (%s); %s", what, path, e,
                                            consequence)
        return False
    return True


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be made in ``folder`` (or in the nearest existing folder above it,
    where it would be made), or None: found by making one, which also catches read-only
    file systems and what os.access cannot see for root."""
    path = Path(folder).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"{path} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"{path}: {e.strerror or type(e).__name__}"
    return None
