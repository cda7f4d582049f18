"""Token F1 between a short answer and a gold answer, as defined by the LoCoMo benchmark's evaluation code.

Normalisation: remove commas, lower-case, remove punctuation (characters deleted, not replaced by spaces),
remove the words a / an / the / and, collapse whitespace. Tokens are the normalised words, Porter-stemmed
(nltk's `PorterStemmer`, which needs no downloaded data). F1 is the harmonic mean of the precision and the
recall of the multiset of shared tokens; no shared token (an empty side included) gives 0.

Nothing here is specific to one benchmark: LoCoMo's per-category rules live in `locas.evaluation.locomo`,
and a recall reward can call `token_f1` directly.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DROPPED_WORDS = re.compile(r"\b(a|an|the|and)\b")


def normalize_answer(text: str) -> str:
    """Lower-cased, punctuation and the words a/an/the/and removed, whitespace collapsed."""
    text = str(text).replace(",", "").lower().translate(_PUNCTUATION)
    return " ".join(_DROPPED_WORDS.sub(" ", text).split())


@lru_cache(maxsize=1)
def _stemmer():
    # nltk is imported on first use: the trainer imports this module (GRPO's reward) and runs without nltk
    from nltk.stem import PorterStemmer

    return PorterStemmer()


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


def answer_tokens(text: str) -> list[str]:
    """The normalised, Porter-stemmed words of `text`."""
    return [_stem(word) for word in normalize_answer(text).split()]


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the stemmed tokens of `prediction` against those of `gold`, in [0, 1]."""
    predicted, expected = answer_tokens(prediction), answer_tokens(gold)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def multi_answer_f1(prediction: str, gold: str, separator: str = ",") -> float:
    """For answers listing several items: both sides are split on `separator`; the mean over the gold
    parts of the best `token_f1` against any predicted part."""
    predicted_parts = [part.strip() for part in str(prediction).split(separator)]
    gold_parts = [part.strip() for part in str(gold).split(separator)]
    return sum(max(token_f1(p, g) for p in predicted_parts) for g in gold_parts) / len(gold_parts)
