"""A procedural English-like corpus: the offline text dataset, as shapes is for images.

Sentences come from a small probabilistic grammar (subject, verb, optional object, optional
adverb or place) with a few dozen words, so a sentence VAE has real structure to find
(sentence length, transitivity, topic words) without any download. Same seed, same text.
"""

from __future__ import annotations

import random

from vae_cli.data.base import check_positive
from vae_cli.data.text import TextData, encode_splits

DETERMINERS = ["the", "a", "every", "one"]
ADJECTIVES = ["small", "brave", "red", "quiet", "happy", "strange", "tall", "green"]
NOUNS = ["cat", "dog", "bird", "child", "teacher", "farmer", "robot", "king", "horse", "fox"]
TRANSITIVE = ["sees", "follows", "likes", "finds", "watches", "helps", "chases", "calls"]
INTRANSITIVE = ["sleeps", "sings", "runs", "waits", "laughs", "dances"]
ADVERBS = ["slowly", "quietly", "again", "today", "happily"]
PLACES = ["in the garden", "near the river", "at home", "under the bridge", "on the hill"]


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    return [*words, rng.choice(NOUNS)]


def sentence(rng: random.Random, clause: int = 0) -> str:
    words = _noun_phrase(rng)
    if rng.random() < 0.6:
        words += [rng.choice(TRANSITIVE), *_noun_phrase(rng)]
    else:
        words.append(rng.choice(INTRANSITIVE))
    tail = rng.random()
    if tail < 0.3:
        words.append(rng.choice(ADVERBS))
    elif tail < 0.6:
        words += rng.choice(PLACES).split()
    if clause == 0 and rng.random() < 0.25:  # a second clause: a wider range of lengths
        words += ["and", *sentence(rng, 1).rstrip(" .").split()]
    return " ".join([*words, "."])


def sentences(n_train: int = 20000, n_val: int = 1000, n_test: int = 1000, seed: int = 0,
              max_length: int = 32, *, vocab: list[str] | None = None) -> TextData:
    check_positive(n_train=n_train, n_val=n_val, n_test=n_test)
    rng = random.Random(seed)
    lines = {s: [sentence(rng) for _ in range(n)]
             for s, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    return encode_splits("sentences", lines, "word", 1, max_length, vocab)
