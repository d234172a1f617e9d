"""`runtime.prefill_rows` against one prefill of the whole batch: the same cache, logits and generated tokens."""

from __future__ import annotations

import pytest
import torch
from test_runtime import GREEDY, left_pad, prompts, schedule_for
from tiny_models import tiny_model
from transformers import DynamicCache

import runtime
from runtime import Decode, Selection
from runtime.layer import PyramidLayer

LENGTHS = (70, 70, 52, 33, 64)  # five rows: chunks of 2 leave one alone; the first chunk holds no padding


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def test_mask_positions_count_each_rows_real_tokens():
    ids, mask = left_pad(prompts(lengths=(5, 3, 1)))
    assert runtime.mask_positions(mask).tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 0, 0, 0, 0]]
    assert torch.equal(runtime.mask_positions(mask), _positions(mask))


def _units(cache):
    return [u for layer in cache.layers for u in layer.units()]


def _schedule(model, mode: str, per_head_shares: bool, per_head_selection: bool = True):
    n = model.config.num_hidden_layers
    kv = model.config.num_key_value_heads
    ratios, head_ratios = None, None
    if per_head_shares:  # every layer's KV heads keep different shares: RaggedLayer
        head_ratios = [[max(0.15, 0.8 - 0.2 * i - 0.25 * h) for h in range(kv)] for i in range(n)]
        ratios = [sum(r) / kv for r in head_ratios]
    return schedule_for(
        model,
        ratios,
        prefill_mode=mode,
        selection=Selection(per_head=per_head_selection),
        decode=Decode(8, stagger=True),
        head_ratios=head_ratios,
    )


def assert_same_caches(cache, whole_cache):
    """The same slots kept by every unit (layer or KV head), the same keys, values and recent queries."""
    assert cache.seen_slots == whole_cache.seen_slots and cache.since_trim == whole_cache.since_trim
    assert torch.equal(cache.seen_valid, whole_cache.seen_valid)
    assert runtime.kv_bytes(cache) == runtime.kv_bytes(whole_cache)
    assert len(_units(cache)) == len(_units(whole_cache))
    for i, (a, b) in enumerate(zip(_units(cache), _units(whole_cache), strict=True)):
        assert type(a) is type(b)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.valid, b.valid), f"unit {i}: other slots kept"
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.q_buf, b.q_buf, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.q_buf_pos, b.q_buf_pos) and torch.equal(a.q_buf_valid, b.q_buf_valid)
        assert a.has_invalid == b.has_invalid


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("mode", ["evict", "drop"])
@pytest.mark.parametrize("per_head_shares, per_head_selection", [(False, False), (False, True), (True, True)])
def test_row_chunks_give_the_whole_batch_prefill(family, mode, per_head_shares, per_head_selection):
    """Llama; Mistral (compressed layers with a sliding window); Gemma 3 (sliding layers keep their window)."""
    model = tiny_model(family, kv_heads=2 if family == "gemma3" else None)
    sched = _schedule(model, mode, per_head_shares, per_head_selection)
    ids, mask = left_pad(prompts(lengths=LENGTHS))
    pos = _positions(mask)
    with runtime.apply(model, sched):
        whole = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        whole_cache = runtime.cache_of(whole)
        logits, cache = runtime.prefill_rows(model, ids, mask, rows=2, position_ids=pos)
        torch.testing.assert_close(logits, whole.logits, rtol=1e-5, atol=1e-5)
        assert_same_caches(cache, whole_cache)
        # then decoding (trims every 8 tokens) goes the same way from either cache
        runs = []
        for c, first in ((cache, logits), (whole_cache, whole.logits)):
            nxt, m, p, out = first[:, -1].argmax(-1, keepdim=True), mask, pos, []
            for _ in range(30):
                out.append(nxt)
                m = torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
                p = p[:, -1:] + 1
                nxt = model(input_ids=nxt, attention_mask=m, position_ids=p, cache=c).logits[:, -1].argmax(-1, True)
            runs.append(torch.cat(out, 1))
    assert torch.equal(runs[0], runs[1])
    assert_same_caches(cache, whole_cache)  # after 30 steps and their trims


def test_positions_default_to_each_rows_own_count():
    model = tiny_model("llama")
    sched = _schedule(model, "evict", True)
    ids, mask = left_pad(prompts(lengths=LENGTHS))
    with runtime.apply(model, sched):
        given, a = runtime.prefill_rows(model, ids, mask, rows=2, position_ids=_positions(mask))
        default, b = runtime.prefill_rows(model, ids, mask, rows=2)
        arange, _ = runtime.prefill_rows(
            model, ids, mask, rows=2, position_ids=torch.arange(ids.shape[1]).expand_as(ids)
        )
    assert torch.equal(given, default)
    assert_same_caches(a, b)
    assert not torch.allclose(given, arange)  # the padded rows' positions do matter


def test_the_merge_frees_each_layer_of_the_chunks_before_the_next(monkeypatch):
    """At most one layer is held twice: when layer i is merged, the chunks no longer hold layers 0..i-1."""
    model = tiny_model("llama")
    ids, mask = left_pad(prompts(lengths=LENGTHS))
    with runtime.apply(model, schedule_for(model)):
        chunks = [runtime.cache_of(model(input_ids=ids[i : i + 2], attention_mask=mask[i : i + 2])) for i in (0, 2, 4)]
    merged_layer = PyramidLayer.cat_rows
    held_earlier = []

    def watched(layers, what="layer", queries=True):
        i = int(what.rsplit(" ", 1)[-1])
        held_earlier.append(any(c.layers[j] is not None for c in chunks for j in range(i)))
        return merged_layer(layers, what, queries)

    monkeypatch.setattr(PyramidLayer, "cat_rows", staticmethod(watched))
    cache = runtime.PyramidCache.cat_rows(chunks)
    assert held_earlier == [False] * 4 and all(c.layers == [] for c in chunks)
    assert cache.seen_valid.shape == (5,)


def test_generate_continues_from_row_chunks():
    model = tiny_model("llama")
    sched = _schedule(model, "evict", True)
    ids, mask = left_pad(prompts(lengths=LENGTHS))
    pos = _positions(mask)
    with runtime.apply(model, sched):
        outs = []
        for rows in (len(LENGTHS), 2):
            _, cache = runtime.prefill_rows(model, ids[:, :-1], mask[:, :-1], rows=rows, position_ids=pos[:, :-1])
            outs.append(model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=20, **GREEDY))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_under_apply_with_prefill_rows_gives_the_same_tokens(family, monkeypatch):
    """`runtime.apply(..., prefill_rows=2)`: generate's prefill of 5 rows runs 2 rows at a time, same output."""
    merges, merge = [], runtime.PyramidCache.cat_rows.__func__
    monkeypatch.setattr(
        runtime.PyramidCache, "cat_rows", classmethod(lambda cls, c: merges.append(len(c)) or merge(cls, c))
    )
    model = tiny_model(family, kv_heads=2 if family == "gemma3" else None)
    sched = _schedule(model, "evict", True)
    ids, mask = left_pad(prompts(lengths=LENGTHS))
    outs, caches = [], []
    for rows in (None, 2):
        with runtime.apply(model, sched, prefill_rows=rows):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=20, return_dict_in_generate=True, **GREEDY)
        outs.append(out.sequences)
        caches.append(runtime.cache_of(out))
    assert merges == [3]  # the prefill only: rows 2 + 2 + 1; decode steps are not split
    assert torch.equal(outs[0], outs[1])
    assert_same_caches(caches[1], caches[0])


def test_apply_with_prefill_rows_refuses_what_a_chunked_prefill_cannot_return():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts())
    with runtime.apply(model, schedule_for(model), prefill_rows=1):
        with pytest.raises(
            ValueError, match=r"prefill_rows=1\): .* not output_hidden_states; leave prefill_rows unset"
        ):
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert runtime.cache_of(model(input_ids=ids[:1], attention_mask=mask[:1])).seen_valid.shape == (1,)
    for bad, shown in ((0, "int 0"), (True, "bool True"), ("2", "str '2'")):
        with pytest.raises(ValueError, match=f"prefill_rows must be None or a whole number >= 1, got {shown}"):
            with runtime.apply(model, schedule_for(model), prefill_rows=bad):
                pass


def test_one_chunk_is_the_plain_call():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts())
    with runtime.apply(model, schedule_for(model)):
        logits, cache = runtime.prefill_rows(model, ids, mask, rows=8)
        plain = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=1)
    assert torch.equal(logits, plain.logits)
    assert not logits.requires_grad  # no autograd graph kept: a prefill's activations go at once
    assert cache.stored_lengths() == runtime.cache_of(plain).stored_lengths()


@pytest.mark.parametrize(
    "rows, match", [(0, "rows must be a whole number >= 1, got int 0"), (True, "got bool True"), (1.5, "float 1.5")]
)
def test_bad_rows_are_named(rows, match):
    model = tiny_model("llama")
    ids, mask = left_pad(prompts())
    with runtime.apply(model, schedule_for(model)), pytest.raises(ValueError, match=match):
        runtime.prefill_rows(model, ids, mask, rows=rows)


def test_needs_the_apply_block_and_matching_shapes():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts())
    with pytest.raises(ValueError, match="not under runtime.apply"):
        runtime.prefill_rows(model, ids, mask, rows=1)
    with runtime.apply(model, schedule_for(model)):
        with pytest.raises(ValueError, match=r"attention_mask must match input_ids' shape \(2, 70\)"):
            runtime.prefill_rows(model, ids, mask[:, 1:], rows=1)
        for bad, shape in ((ids[0], r"\(70,\)"), (ids[:0], r"\(0, 70\)")):
            with pytest.raises(ValueError, match=r"input_ids must be a \[batch, tokens\] tensor .* shape " + shape):
                runtime.prefill_rows(model, bad, rows=1)
    assert not runtime.integration.is_applied(model)


def test_cat_rows_refuses_chunks_that_do_not_belong_together_and_leaves_them_whole():
    model = tiny_model("llama")
    ids, mask = left_pad(prompts())
    with runtime.apply(model, schedule_for(model)):
        a = runtime.cache_of(model(input_ids=ids[:1], attention_mask=mask[:1]))
        b = runtime.cache_of(model(input_ids=ids[1:, 10:], attention_mask=mask[1:, 10:]))
    with runtime.apply(model, schedule_for(model, [0.5] * 4)):
        c = runtime.cache_of(model(input_ids=ids[1:], attention_mask=mask[1:]))
    lengths = (a.stored_lengths(), b.stored_lengths(), c.stored_lengths())
    with pytest.raises(ValueError, match=r"fed \[60, 70\] tokens; chunks of one batch must be fed the same"):
        runtime.PyramidCache.cat_rows([a, b])
    with pytest.raises(ValueError, match="the row chunks ran under different schedules"):
        runtime.PyramidCache.cat_rows([a, c])
    with pytest.raises(ValueError, match=r"caches\[1\] is DynamicCache .*, not a PyramidCache"):
        runtime.PyramidCache.cat_rows([a, DynamicCache()])
    assert (a.stored_lengths(), b.stored_lengths(), c.stored_lengths()) == lengths  # nothing emptied
