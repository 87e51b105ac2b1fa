"""Contamination: how much of an evaluation set appears in the training text, by word n-grams
(part of :mod:`gemma2_lite.evaluate`, which re-exports these names; chapter 08d).

The Gemma 2 report filters its pre-training data against evaluation sets; this module measures
the overlap an evaluation would have to worry about, and chapter 08d shows what a deliberately
contaminated run does to a score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .checks import check_int

__all__ = ["word_ngrams", "ngram_index", "contamination"]


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The word n-grams of ``text``: words are runs of letters and apostrophes, lower-cased
    (punctuation, case and line breaks do not hide an overlap)."""
    check_int(n, "n", low=1)
    words = re.findall(r"[a-z']+", text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_index(text: str, n: int) -> np.ndarray:
    """Sorted unique hashes of every word n-gram of ``text`` (int64), for :func:`contamination`.
    Hashes are Python's, so an index is valid in the process that built it."""
    return np.unique(np.array([hash(g) for g in word_ngrams(text, n)], np.int64))


def contamination(texts: Sequence[str], train: str | np.ndarray, n: int = 8) -> dict[str, Any]:
    """How much of an evaluation set appears in training text, by word n-grams.

    texts: one string per item (e.g. its context and answer). train: the training text, or
    its :func:`ngram_index` for this ``n``. An item is *contaminated* when at least one of its
    n-grams occurs in the training text. Returns ``{"n", "items", "contaminated", "rate",
    "short" (items with fewer than n words: never flagged), "ngram_rate" (share of all the
    items' n-grams found), "flags" (bool per item)}``.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError(
            "texts must be a non-empty list of strings (one per item), got "
            f"{type(texts).__name__} of length {len(texts)}"
        )
    index = ngram_index(train, n) if isinstance(train, str) else np.asarray(train)
    if index.dtype != np.int64 or index.ndim != 1 or np.any(index[1:] <= index[:-1]):
        raise ValueError(
            "train must be the training text or its ngram_index (sorted unique "
            f"int64 hashes), got an array of {index.dtype} {index.shape}"
        )
    flags, found, total, short = [], 0, 0, 0
    for text in texts:
        grams = np.array([hash(g) for g in word_ngrams(text, n)], np.int64)
        at = np.minimum(np.searchsorted(index, grams), max(len(index) - 1, 0))  # sorted
        hits = index[at] == grams if len(index) else np.zeros(len(grams), bool)
        flags.append(bool(hits.any()))
        found, total, short = found + int(hits.sum()), total + len(grams), short + (not len(grams))
    return {
        "n": n,
        "items": len(texts),
        "contaminated": sum(flags),
        "rate": sum(flags) / max(len(texts), 1),
        "short": short,
        "ngram_rate": found / max(total, 1),
        "flags": flags,
    }
