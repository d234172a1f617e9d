"""`runtime.inspect`: the read API that calibration and evaluation use instead of cache attributes."""

from __future__ import annotations

import pytest
import torch
from test_ragged import head_schedule, layer_heads
from test_runtime import prompts
from tiny_models import tiny_model

import runtime
import runtime.inspect as inspect
from runtime import Schedule
from runtime.schedule import kept_tokens


def prefilled(model, schedule: Schedule, length: int = 90):
    with runtime.apply(model, schedule):
        return runtime.cache_of(model(prompts(lengths=(length,))[0]))


def test_kept_per_row_counts_each_heads_real_tokens():
    model = tiny_model("llama")
    heads = layer_heads(model)
    sched = head_schedule(heads)
    cache = prefilled(model, sched)
    for i, shares in enumerate(heads):
        expected = sum(kept_tokens(r, 90, sched.sinks, sched.window) for r in shares) / len(shares)
        assert float(inspect.kept_per_row(cache, i)[0]) == pytest.approx(expected)
        units = inspect.kept(cache, i)
        assert len(units) == (2 if len(set(shares)) > 1 else 1)
        assert all(u.keys.shape[2] == u.positions.shape[-1] == u.valid.shape[-1] for u in units)


def test_selection_scores_from_the_newest_queries_only():
    """Scoring with the newest w queries equals a cache that only ever remembered w queries."""
    model = tiny_model("llama")
    n = model.config.num_hidden_layers
    wide = prefilled(model, Schedule(ratios=[1.0] * n, window=16, sinks=2))
    narrow = prefilled(model, Schedule(ratios=[1.0] * n, window=4, sinks=2))
    probe = Schedule(ratios=[1.0] * n, window=4, sinks=2)
    for i in range(n):
        assert inspect.recent_queries(wide, i).queries.shape[2] == 16
        got = inspect.selection_scores(wide, i, probe, queries=4)
        want = inspect.selection_scores(narrow, i, probe)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(inspect.selection_scores(wide, i, probe), want)


def test_bad_arguments_are_one_line_errors():
    model = tiny_model("llama")
    cache = prefilled(model, head_schedule(layer_heads(model)))
    with pytest.raises(TypeError, match="expected a runtime PyramidCache, got str"):
        inspect.kept("not a cache", 0)
    with pytest.raises(IndexError, match="layer 9 is out of range: the cache has 4 layers"):
        inspect.kept_per_row(cache, 9)
    with pytest.raises(ValueError, match="one unit per KV head"):
        inspect.selection_scores(cache, 0, Schedule(ratios=[1.0] * 4))
