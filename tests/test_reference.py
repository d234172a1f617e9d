"""Reference schedules (runtime/reference.py) against hand-computed values."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from runtime.reference import (
    KINDS,
    all_ones,
    at_budget,
    pyramidinfer_cosine,
    pyramidinfer_ratios,
    pyramidkv_linear,
    rescale_to_budget,
    uniform,
)
from runtime.schedule import ModelInfo, Schedule, ScheduleError


def test_uniform_mean_fraction_by_hand():
    # 100 tokens, sinks 4, window 32: context 64, ratio 0.5 keeps 32 of it -> 36 + 32 = 68 per layer
    s = uniform(4, 0.5, sinks=4, window=32)
    assert s.ratios == [0.5] * 4
    assert s.kept_tokens(100) == [68] * 4
    assert s.kv_fraction(100) == pytest.approx(0.68)


def test_all_ones():
    s = all_ones(5)
    assert s.ratios == [1.0] * 5
    assert s.kv_fraction(2048) == 1.0


def test_pyramidinfer_cosine_by_hand():
    # L = 4, r = 0.9: s_l = 0.1 * (cos(pi l / 4) + 1) / 2 + 0.9
    #   s_0 = 1, s_1 = 0.9 + 0.05 * (1 + 0.70710678) = 0.98535534, s_2 = 0.95,
    #   s_3 = 0.9 + 0.05 * (1 - 0.70710678) = 0.91464466
    # cumulative: 1, 0.98535534, 0.98535534 * 0.95 = 0.93608757,
    #   s_1 * s_2 * s_3 = 0.95 * (0.95^2 - 0.05^2 / 2) = 0.8561875
    expected = [1.0, 0.98535534, 0.93608757, 0.8561875]
    assert pyramidinfer_ratios(4, 0.9) == pytest.approx(expected, abs=1e-8)
    s = pyramidinfer_cosine(4)
    assert s.ratios == pytest.approx(expected, abs=1e-8)
    assert s.provenance["reference"] == "pyramidinfer"


def test_pyramidinfer_r_one_keeps_everything():
    assert pyramidinfer_ratios(6, 1.0) == [1.0] * 6


def test_pyramidkv_linear_by_hand():
    # ratio 0.2, beta 20: min = 0.01, max = 0.39, linear over 5 layers, mean 0.2
    s = pyramidkv_linear(5, 0.2, beta=20)
    assert s.ratios == pytest.approx([0.39, 0.295, 0.2, 0.105, 0.01])
    assert sum(s.ratios) / 5 == pytest.approx(0.2)


def test_pyramidkv_clips_at_one_and_keeps_the_mean():
    # ratio 0.8: max would be 1.6 - 0.04 = 1.56; clipped to 1 with min raised to 2 * 0.8 - 1 = 0.6
    s = pyramidkv_linear(4, 0.8)
    assert s.ratios == pytest.approx([1.0, 13 / 15, 11 / 15, 0.6])
    assert sum(s.ratios) / 4 == pytest.approx(0.8)
    assert max(s.ratios) <= 1.0


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.52, 0.7, 0.99, 1.0])
def test_pyramidkv_mean_and_endpoints(ratio: float):
    s = pyramidkv_linear(30, ratio)
    assert sum(s.ratios) / 30 == pytest.approx(ratio)
    assert all(0 < r <= 1 for r in s.ratios)
    assert all(a >= b for a, b in zip(s.ratios, s.ratios[1:]))
    if 2 * ratio - ratio / 20 <= 1:
        assert s.ratios[0] == pytest.approx(2 * ratio - ratio / 20)
        assert s.ratios[-1] == pytest.approx(ratio / 20)


def test_one_layer():
    assert pyramidkv_linear(1, 0.3).ratios == [0.3]
    assert pyramidinfer_ratios(1) == [1.0]


@pytest.mark.parametrize("kind", ["uniform", "pyramidkv", "pyramidinfer"])
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3, 0.5, 0.75, 0.95, 1.0])
def test_at_budget_hits_the_budget(kind: str, budget: float):
    s = at_budget(kind, 30, budget, prompt_tokens=2048)
    assert abs(s.kv_fraction(2048) - budget) < 1e-3
    assert s.budget == budget and s.context_length == 2048
    assert s.provenance["reference"] == kind
    assert all(a >= b - 1e-12 for a, b in zip(s.ratios, s.ratios[1:]))


def test_at_budget_uses_schedule_settings():
    s = at_budget("pyramidkv", 18, 0.4, prompt_tokens=1024, sinks=8, window=64)
    assert (s.sinks, s.window) == (8, 64)
    assert abs(s.kv_fraction(1024) - 0.4) < 1e-3


def test_at_budget_counts_compressible_layers_only():
    flags = [i % 6 == 5 for i in range(18)]  # Gemma 3 270M: full attention in layers 5, 11, 17
    model = ModelInfo("gemma3-270m", 18, 1, 256, "f", compressible=flags)
    s = at_budget("uniform", 18, 0.25, prompt_tokens=4096, model=model)
    assert abs(s.kv_fraction(4096) - 0.25) < 1e-3


@pytest.mark.parametrize("budget", [0.2, 0.4, 0.6, 0.8])
def test_rescale_arbitrary_shape(budget: float):
    shape = [1.0, 0.9, 0.5, 0.5, 0.2, 0.1, 0.05, 0.01]
    s = rescale_to_budget(shape, budget, prompt_tokens=4096, sinks=4, window=32)
    assert abs(s.kv_fraction(4096) - budget) < 1e-3
    # the shape is kept where nothing is clipped at 1
    unclipped = [(r, x) for r, x in zip(s.ratios, shape) if r < 1.0]
    factors = {round(r / x, 9) for r, x in unclipped}
    assert len(factors) == 1


def test_rescale_schedule_keeps_settings():
    base = pyramidinfer_cosine(30, sinks=2, window=16, name="mine")
    s = rescale_to_budget(base, 0.3, prompt_tokens=2048)
    assert (s.sinks, s.window, s.name) == (2, 16, "mine")
    assert abs(s.kv_fraction(2048) - 0.3) < 1e-3


def test_rescale_reaches_the_exact_minimum():
    s = rescale_to_budget([1.0, 1.0], 0.36, prompt_tokens=100, sinks=4, window=32)
    assert s.kv_fraction(100) == pytest.approx(0.36)


def test_rescale_refuses_impossible_budget():
    with pytest.raises(ScheduleError, match=r"budget 0.3 is below the minimum 0.3600 = \(sinks 4 \+ window 32\) / 100"):
        rescale_to_budget([1.0, 0.5], 0.3, prompt_tokens=100, sinks=4, window=32)
    with pytest.raises(ScheduleError, match="below the minimum"):
        at_budget("pyramidkv", 30, 0.01, prompt_tokens=2048)


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_budget_out_of_range(budget: float):
    with pytest.raises(ScheduleError, match="budget"):
        at_budget("uniform", 4, budget)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: uniform(0, 0.5), "num_layers 0"),
        (lambda: uniform(4, 0.0), "ratio 0.0 is outside"),
        (lambda: uniform(4, 1.2), "ratio 1.2 is outside"),
        (lambda: pyramidkv_linear(4, 0.3, beta=0.5), "beta"),
        (lambda: pyramidinfer_cosine(4, r=1.5), "r 1.5"),
        (lambda: at_budget("snapkv", 4, 0.3), "unknown reference kind 'snapkv'"),
        (lambda: at_budget("uniform", 4, None), "needs a budget"),
        (lambda: at_budget("all_ones", 4, 0.5), "all_ones keeps every token"),
        (lambda: at_budget("uniform", 4, 0.5, prompt_tokens=0), "prompt_tokens 0"),
        (lambda: rescale_to_budget([1.0, 0.0], 0.5, prompt_tokens=100), r"shape\[1\]"),
    ],
)
def test_bad_arguments(call, message: str):
    with pytest.raises(ScheduleError, match=message):
        call()


def test_at_budget_all_ones():
    s = at_budget("all_ones", 30, None)
    assert s.ratios == [1.0] * 30 and s.kv_fraction(2048) == 1.0
    assert set(KINDS) == {"uniform", "pyramidkv", "pyramidinfer", "all_ones"}


def test_reference_schedules_round_trip(tmp_path: Path):
    from runtime.schedule import load_schedule

    for kind in ("uniform", "pyramidkv", "pyramidinfer"):
        s = at_budget(kind, 30, 0.3)
        assert load_schedule(s.save(tmp_path / f"{kind}.json")) == s
    assert isinstance(s, Schedule)


def test_reference_module_is_pure(repo_root: Path):
    """runtime/reference.py imports only the schedule module and the standard library."""
    tree = ast.parse((repo_root / "runtime" / "reference.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "math", "collections.abc", "typing", ".schedule"}
