"""The one exception type that reaches the user as a single line, and the one way any
exception is shortened to a line for a message."""

from __future__ import annotations

import re

# Long enough for a path and a reason, short enough for one terminal line or two.
LIMIT = 300


class UserError(Exception):
    """Bad input (config, data, checkpoint): printed as one line, exit code 2."""

    exit_code: int = 2


def one_line(e: BaseException, chain: bool = False, last: bool = False,
             limit: int = LIMIT) -> str:
    """``e``'s message for a user on one line: its first line (the exception's type when it
    says nothing), or its ``last`` (torchvision ends its messages with the cause).
    ``chain``: every line of it and of its causes, joined, as Hydra and OmegaConf spread
    theirs over several lines with the key and object type."""
    if not chain:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return lines[-1 if last else 0].strip()[:limit]
    parts: list[str] = []
    cause: BaseException | None = e
    while cause is not None and len(parts) < 4:
        for line in str(cause).splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type=")) and line not in parts:
                parts.append(line)
        cause = cause.__cause__
    return "; ".join(parts).replace(":;", ":").replace(".;", ";")[:limit]


def buried(e: BaseException, kind: type | tuple[type, ...]) -> BaseException | None:
    """The first of ``e`` and its causes and contexts that is a ``kind``, or None: a library
    that wraps what it caught (torch's exporter wraps a signal's exception) hides it."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def out_of_memory(e: BaseException) -> str | None:
    """The one line for an allocation that failed (host memory, or a GPU's), else None:
    the size asked for and what needs less. torch reports a host failure as a plain
    RuntimeError, a GPU's as its OutOfMemoryError (a RuntimeError too)."""
    text = str(e)
    gpu = type(e).__name__ == "OutOfMemoryError" or " out of memory" in text
    if not (gpu or isinstance(e, MemoryError) or "can't allocate memory" in text):
        return None
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ \w+)", text)  # "2.00 GiB", "160 bytes"
    size = asked and asked[1]
    if size and size.endswith(" bytes"):
        size = f"{int(size.split()[0]) / 2**30:.1f} GiB"
    where = "on the GPU" if gpu else "in host memory"
    return (f"out of memory {where}" + (f" (it asked for {size} at once)" if size else "")
            + ": a smaller trainer.batch_size (trainer.accumulate keeps the batch the "
            "optimizer sees), trainer.precision=bf16 or a smaller model needs less; in vae "
            "eval, a smaller eval.iw_batch")
