"""LongBench's scoring rules, written from their definitions, and bootstrap confidence intervals.

Pure functions (standard library and numpy only). Scores are in [0, 1]; reports multiply by 100 as LongBench does.

    from calibrate.metrics import score, bootstrap_ci
    score("hotpotqa", "The Eiffel Tower.", ["Eiffel Tower"])   # 1.0
    bootstrap_ci([1.0, 0.0, 1.0, 1.0])                          # Interval(mean=0.75, low=..., high=..., n=4)

Where the official scorer (THUDM/LongBench `metrics.py`, `eval.py`) leans on a third-party package, this module
follows the package's definition; the differences are named in each function's docstring.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---------------------------------------------------------------- text normalisation


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# ---------------------------------------------------------------- metrics


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction)
    recall = overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str) -> float:
    """Token-level F1 between the normalised prediction and one normalised gold answer."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else (row[j] if row[j] >= row[j - 1] else row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_tokens(text: str) -> list[str]:
    # the `rouge` package LongBench uses splits sentences on "." and words on whitespace, with no lower-casing
    return text.replace(".", " ").split()


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1: longest common subsequence of whitespace tokens, as precision/recall against each side.

    LongBench calls the `rouge` package's summary-level ROUGE-L (union LCS over sentences split at "."); this
    is the sequence-level LCS over the same tokens, so multi-sentence summaries can score slightly differently.
    """
    p, g = _rouge_tokens(prediction), _rouge_tokens(gold)
    if not p or not g:
        return 0.0
    common = lcs_length(p, g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def edit_similarity(a: str, b: str) -> float:
    """1 - indel distance / (len(a) + len(b)) = 2 * LCS / (len(a) + len(b)) over characters; 1 for two empties.

    This is the normalised Levenshtein ratio that fuzzywuzzy's `fuzz.ratio` reports (as an integer percent,
    rounded; here unrounded), where a substitution costs two edits (a deletion and an insertion).
    """
    total = len(a) + len(b)
    if total == 0:
        return 1.0
    return 2 * lcs_length(a, b) / total


def first_code_line(prediction: str) -> str:
    """The line LongBench scores for code completion: the first line (after leading newlines) that holds no
    backtick, '#' or '//', i.e. skipping markdown fences and comments; empty when there is none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, gold: str) -> float:
    """Edit similarity between the first code line of the prediction and the gold next line."""
    return edit_similarity(first_code_line(prediction), gold)


def count_score(prediction: str, gold: str) -> float:
    """passage_count: the share of the numbers in the prediction that equal the gold count (0 if none)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(gold).strip() for n in numbers) / len(numbers)


METRICS: dict[str, Callable[[str, str], float]] = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "code_sim": code_sim,
    "count": count_score,
}

DATASET_METRIC = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "triviaqa": "qa_f1",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "samsum": "rouge_l",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
    "passage_count": "count",
}

# LongBench keeps only the first line of the answer for these few-shot tasks before scoring
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}


def dataset_name(name: str) -> str:
    """'hotpotqa_e' -> 'hotpotqa' (LongBench-E files score like their LongBench tasks)."""
    return name[:-2] if name.endswith("_e") else name


def score(dataset: str, prediction: str, answers: Sequence[str]) -> float:
    """A LongBench score in [0, 1]: the dataset's metric, best over the gold answers."""
    name = dataset_name(dataset)
    if name not in DATASET_METRIC:
        raise KeyError(f"no metric for dataset '{dataset}'; known: {', '.join(sorted(DATASET_METRIC))}")
    metric = METRICS[DATASET_METRIC[name]]
    if name in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((metric(prediction, gold) for gold in answers), default=0.0)


# ---------------------------------------------------------------- confidence intervals


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean and percentile-bootstrap confidence interval of the mean (seeded, so it repeats exactly).

    One value gives a zero-width interval at that value; no values give NaNs.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0)
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return Interval(mean, mean, mean, int(x.size))
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level} is outside (0, 1)")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # the percentile interval of a skewed sample can sit beside the mean by a rounding error; keep it inside
    return Interval(mean, float(min(low, mean)), float(max(high, mean)), int(x.size))


def stratified_ci(
    groups: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Interval:
    """The mean over groups of each group's mean (e.g. a benchmark average over datasets), with a bootstrap CI
    that resamples within every group. Empty groups are left out; `n` counts all values."""
    arrays = [np.asarray([float(v) for v in g], dtype=np.float64) for g in groups]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        nan = float("nan")
        return Interval(nan, nan, nan, 0)
    n = int(sum(a.size for a in arrays))
    mean = float(np.mean([a.mean() for a in arrays]))
    if all(a.size == 1 or np.all(a == a[0]) for a in arrays):
        return Interval(mean, mean, mean, n)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level} is outside (0, 1)")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for a in arrays:
        total += a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    means = total / len(arrays)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean, float(min(low, mean)), float(max(high, mean)), n)
