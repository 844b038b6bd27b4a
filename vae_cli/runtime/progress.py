"""Progress bars for the long loops (training epochs, the IWAE bound, fitting samplers and
feature networks, decoding samples): drawn by the first process only, and off when the
output is not a terminal (tqdm's own test), so logs and captured output stay clean."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from vae_cli.runtime import distributed


def bar(total: int, desc: str, initial: int = 0, unit: str = "it",
        iterable: Iterable[Any] | None = None) -> tqdm:
    """A bar that vanishes when done: iterate it, or call ``update(n)`` as work completes."""
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=False,
                dynamic_ncols=True, disable=None if distributed.rank() == 0 else True)


def counted(n: int, desc: str, unit: str = "it") -> tqdm:
    """range(n) with a bar, for loops that count their steps."""
    return bar(n, desc, unit=unit, iterable=range(n))
