"""LongBench metrics (hand-computed values) and bootstrap confidence intervals."""

from __future__ import annotations

import math

import pytest

from calibrate import metrics
from calibrate.metrics import (
    bootstrap_ci,
    code_sim,
    count_score,
    edit_similarity,
    first_code_line,
    lcs_length,
    normalize_answer,
    qa_f1,
    rouge_l,
    score,
    stratified_ci,
)


def test_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert normalize_answer("  \n ") == ""


def test_qa_f1():
    # "cat sat on mat" vs "cat on mat": overlap 3, precision 3/4, recall 1 -> 2 * 0.75 / 1.75
    assert qa_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1("Paris.", "paris") == 1.0
    assert qa_f1("London", "Paris") == 0.0
    assert qa_f1("", "Paris") == 0.0
    # repeated tokens count as a multiset: "a a b" (norm "b"), so use words that are not articles
    assert qa_f1("yes yes no", "yes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_lcs_and_rouge_l():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # "." separates like a space; case is kept (as the rouge package does)
    assert rouge_l("A b. C", "A b C") == 1.0
    assert rouge_l("a b c d", "A B") == 0.0
    # precision 2/4, recall 2/2 -> 2/3
    assert rouge_l("x y z w", "x w") == pytest.approx(2 / 3)
    assert rouge_l("", "x") == 0.0


def test_edit_similarity_and_code_sim():
    assert edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)  # LCS "ittn": 2 * 4 / 13
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    assert first_code_line("\n\n# comment\n// other\n```java\nint x = 1;\nfoo();") == "int x = 1;"
    assert first_code_line("# only a comment") == ""
    assert code_sim("```\nint x = 1;\n```", "int x = 1;") == 1.0
    assert code_sim("return a;", "return b;") == pytest.approx(2 * 8 / 18)


def test_count_score():
    assert count_score("There are 5 paragraphs, not 6.", "5") == 0.5
    assert count_score("5", "5") == 1.0
    assert count_score("no idea", "5") == 0.0
    assert count_score("15", "5") == 0.0  # whole numbers only


def test_score_per_dataset():
    assert score("hotpotqa_e", "The Eiffel Tower.", ["Louvre", "Eiffel Tower"]) == 1.0  # best gold answer
    assert score("passage_count", "7", ["7"]) == 1.0
    assert score("lcc", "x = 1\n", ["x = 1"]) == 1.0
    assert score("gov_report", "a b c", ["a b c"]) == 1.0
    # triviaqa keeps only the first line of the prediction
    assert score("triviaqa", "\nParis\nLondon", ["London"]) == 0.0
    assert score("triviaqa", "\nLondon\nParis", ["London"]) == 1.0
    assert score("qasper", "anything", []) == 0.0
    assert {metrics.DATASET_METRIC[d] for d in ("qasper", "multifieldqa_en", "2wikimqa", "triviaqa")} == {"qa_f1"}
    with pytest.raises(KeyError):
        score("unknown_task", "a", ["a"])


def test_bootstrap_ci_contains_mean_and_repeats():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25]
    a = bootstrap_ci(values, seed=3)
    assert a.mean == pytest.approx(sum(values) / len(values))
    assert a.low <= a.mean <= a.high
    assert 0.0 <= a.low < a.high <= 1.0
    assert bootstrap_ci(values, seed=3) == a
    assert bootstrap_ci(values, seed=4) != a
    assert bootstrap_ci(values, level=0.5, seed=3).high - bootstrap_ci(values, level=0.5, seed=3).low < a.high - a.low
    one = bootstrap_ci([0.7])
    assert (one.mean, one.low, one.high, one.n) == (0.7, 0.7, 0.7, 1)
    assert math.isnan(bootstrap_ci([]).mean)
    assert a.to_dict()["n"] == len(values)


def test_stratified_ci_is_mean_of_group_means():
    s = stratified_ci([[1.0, 1.0, 1.0], [0.0]])
    assert s.mean == 0.5 and s.n == 4
    s = stratified_ci([[1.0, 0.0], [0.0, 0.0, 1.0, 1.0]], seed=1)
    assert s.mean == 0.5 and s.low <= 0.5 <= s.high
    assert stratified_ci([[1.0, 0.0], [0.0, 0.0, 1.0, 1.0]], seed=1) == s
    assert math.isnan(stratified_ci([[], []]).mean)
