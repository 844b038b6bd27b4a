"""The model card of an export: its Python snippet, run as a user would."""

from __future__ import annotations

import re
from pathlib import Path


def snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def load_with_the_card(folder: Path, monkeypatch):
    """Runs the model card's own Python snippet in the export folder; returns its model."""
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(snippet((folder / "README.md").read_text()), scope)  # noqa: S102 - our own card
    return scope["model"]
