"""Per-KV-head shares (`head_ratios`): each head holds exactly its own tokens, and outputs match the masked form."""

from __future__ import annotations

import json

import pytest
import torch
from test_runtime import GREEDY, left_pad, prompts
from tiny_models import FAMILIES, tiny_model

import runtime
import runtime.inspect
from runtime import Schedule, ScheduleError, Selection
from runtime.cache import RaggedLayer
from runtime.schedule import kept_tokens

HEADS = [[0.5, 0.2], [0.9, 0.3], [0.3, 0.3], [0.25, 0.6]]  # tiny models: 2 KV heads; layer 2 is even


def layer_heads(model) -> list[list[float]]:
    return [HEADS[i % len(HEADS)] for i in range(model.config.num_hidden_layers)]


def head_schedule(heads=HEADS, **kw) -> Schedule:
    kw.setdefault("window", 8)
    kw.setdefault("sinks", 2)
    return Schedule(ratios=[sum(h) / len(h) for h in heads], head_ratios=heads, **kw)


def masked_reference(model, ctx, schedule: Schedule):
    """The same shares the slow way: one rectangular [B, H, T, D] layer per layer, each head's surplus masked."""
    n = model.config.num_hidden_layers
    probe = Schedule(ratios=[1.0] * n, window=schedule.window, sinks=schedule.sinks)
    with runtime.apply(model, probe):
        cache = runtime.cache_of(model(ctx))
    cache = cache.fork(probe)
    for layer, shares in zip(cache.layers, schedule.head_ratios, strict=True):
        if not layer.plan_compressible:
            continue
        counts = [kept_tokens(r, ctx.shape[1], schedule.sinks, schedule.window) for r in shares]
        scores = layer.scores(schedule, layer.scaling)
        keep = torch.tensor(counts).expand(scores.shape[0], -1)
        layer.trim(scores, schedule, None, max(counts), keep=keep)
    return cache


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_each_head_holds_exactly_its_share(family):
    model = tiny_model(family, kv_heads=2)
    heads = layer_heads(model)
    sched = head_schedule(heads)
    with runtime.apply(model, sched):
        cache = runtime.cache_of(model(prompts(lengths=(90,))[0]))
    plan = runtime.families.layer_plan(model)
    expected_bytes = 0
    for i, (layer, (compressible, _)) in enumerate(zip(cache.layers, plan, strict=True)):
        if not compressible:
            expected_bytes += layer.kv_nbytes()
            continue
        uneven = len(set(heads[i])) > 1
        assert isinstance(layer, RaggedLayer) == uneven, f"layer {i}"
        units = layer.units()
        counts = [u.stored() for u in units]
        want = [kept_tokens(r, 90, sched.sinks, sched.window) for r in (heads[i] if uneven else [heads[i][0]])]
        assert counts == want and all(bool(u.valid.all()) for u in units), f"layer {i}"
        expected_bytes += sum(2 * u.keys.numel() * u.keys.element_size() for u in units)
    assert runtime.kv_bytes(cache) == expected_bytes  # no padding slots: uneven heads really free memory
    assert sched.kv_fraction(90) < Schedule(ratios=[max(h) for h in heads], window=8, sinks=2).kv_fraction(90)


def test_fork_of_a_compressed_ragged_cache_continues_like_the_original():
    """`calibrate eval` scores a gold answer on a fork of the compressed cache, then generates from the cache
    itself: both must continue as a cache never forked does, and the fork's appends must not reach the source."""
    model = tiny_model("llama", kv_heads=2)
    sched = head_schedule(layer_heads(model))
    ctx, cont = prompts(lengths=(80, 20))
    with runtime.apply(model, sched):
        expected = model(cont, cache=runtime.cache_of(model(ctx))).logits
        source = runtime.cache_of(model(ctx))
        forked = source.fork(sched)
        assert [type(a) for a in forked.layers] == [type(b) for b in source.layers]
        assert any(isinstance(layer, RaggedLayer) for layer in forked.layers)
        got_fork = model(cont, cache=forked).logits
        got_source = model(cont, cache=source).logits
    torch.testing.assert_close(got_fork, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_source, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="holds 2 KV heads, the schedule gives 3"):
        source.fork(head_schedule([[0.2, 0.5, 0.5] for _ in sched.ratios]))


def test_measured_kv_fraction_counts_each_heads_tokens():
    """`calibrate eval` measures a schedule's KV fraction from the cache: with uneven heads it is the mean over
    heads of what each one holds, per row of a padded batch."""
    from calibrate.evaluation import row_kv_fractions

    model = tiny_model("llama", kv_heads=2)
    sched = head_schedule(layer_heads(model))
    ids, mask = left_pad(list(prompts(lengths=(90, 60))))
    with runtime.apply(model, sched):
        cache = runtime.cache_of(model(ids, attention_mask=mask))
    assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
    plan = runtime.families.layer_plan(model)
    measured = row_kv_fractions(cache, plan, [90, 60])
    assert measured == pytest.approx([sched.kv_fraction(90), sched.kv_fraction(60)], abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_ragged_heads_equal_the_masked_rectangular_form(family):
    """Split heads (one attention per KV head) give what one [B, H, T, D] layer with masked surplus slots gives,
    after a real prefill and after fork + compress_now (what calibration scores) alike."""
    model = tiny_model(family, kv_heads=2)
    sched = head_schedule(layer_heads(model))
    ctx, cont = prompts(lengths=(80, 12))
    masked = masked_reference(model, ctx, sched)
    with runtime.apply(model, sched):
        expected = model(cont, cache=masked).logits
        real = runtime.cache_of(model(ctx))
        got_real = model(cont, cache=real).logits
    n = model.config.num_hidden_layers
    with runtime.apply(model, Schedule(ratios=[1.0] * n, window=sched.window, sinks=sched.sinks)):
        base = runtime.cache_of(model(ctx))
    forked = base.fork(sched)
    forked.compress_now()
    assert any(isinstance(layer, RaggedLayer) for layer in forked.layers)
    with runtime.apply(model, sched):
        got_fork = model(cont, cache=forked).logits
    torch.testing.assert_close(got_real, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_fork, expected, rtol=1e-4, atol=1e-5)
    assert max(base.stored_lengths()) == 80  # the source cache is untouched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["evict", "drop"])
def test_padded_batch_equals_each_row_alone_with_head_shares(family, mode):
    """Across decode-time trims (interval 16) too: a row's tokens do not depend on its neighbours."""
    model = tiny_model(family, kv_heads=2)
    sched = head_schedule(layer_heads(model), prefill_mode=mode, decode=runtime.Decode(interval=16))
    rows = prompts()
    ids, mask = left_pad(rows)
    with runtime.apply(model, sched):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, return_dict_in_generate=True, **GREEDY)
        for i, row in enumerate(rows):
            alone = model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=40, **GREEDY)
            assert torch.equal(out.sequences[i, ids.shape[1] :], alone[0, row.shape[1] :]), f"row {i} differs"
    cache = runtime.cache_of(out)
    ragged = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    assert ragged and all(layer.heads[0].stored() != layer.heads[1].stored() for layer in ragged)


def test_head_ratios_round_trip_and_plain_files_stay_as_they_were(tmp_path):
    sched = head_schedule()
    loaded = runtime.load_schedule(sched.save(tmp_path / "h.json"))
    assert loaded.head_ratios == HEADS and loaded.ratios == sched.ratios
    plain = Schedule(ratios=[0.5] * 4)
    assert "head_ratios" not in json.loads(plain.save(tmp_path / "p.json").read_text())
    assert sched.with_ratios(sched.ratios).head_ratios == HEADS  # a rename keeps the split
    assert sched.with_ratios([0.5] * 4).head_ratios is None  # new layer shares drop it


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ratios=[0.5, 0.6, 0.3, 0.425]), r"ratios\[0\].*average 0.35.*mean of its layer's head_ratios"),
        (dict(head_ratios=[[0.5, 0.2]] * 3), "has 3 rows for 4 layers"),
        (dict(head_ratios=[[0.5, 1.5], [0.6], [0.3, 0.3], [0.4, 0.4]]), "rows differ in length"),
        (dict(head_ratios=[[0.5, "x"]] * 4), "not a list of lists of numbers"),
        (dict(selection=Selection(per_head=False)), "needs per-head selection"),
    ],
)
def test_bad_head_ratios_get_one_line_errors(change, message):
    fields = dict(ratios=[sum(h) / 2 for h in HEADS], head_ratios=HEADS, window=8, sinks=2)
    fields.update(change)
    with pytest.raises(ScheduleError, match=message):
        Schedule(**fields)


def test_head_ratios_must_match_the_models_kv_heads():
    model = tiny_model("llama")
    info = runtime.model_info(model)
    three = [[0.4, 0.5, 0.6]] * 4
    with pytest.raises(ScheduleError, match="needs 2 shares per layer"):
        Schedule(ratios=[0.5] * 4, head_ratios=three, model=info)
    with pytest.raises(ScheduleError, match="3 head shares per layer but the model has 2 KV heads"):
        with runtime.apply(model, Schedule(ratios=[0.5] * 4, head_ratios=three)):
            pass


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["evict", "drop"])
def test_flat_decode_storage_equals_head_by_head_appends(family, mode, monkeypatch):
    """The flat buffers (one index_copy_ per field and step) hold what separate per-head buffers hold, through
    decode-time trims and a left-padded batch: same tokens, same slots, same bytes allocated (every head here trims,
    so both give each the same room)."""
    model = tiny_model(family, kv_heads=2)
    sched = head_schedule(layer_heads(model), prefill_mode=mode, decode=runtime.Decode(interval=8))
    ids, mask = left_pad(prompts())
    runs = {}
    for flat in (False, True):
        monkeypatch.setattr(RaggedLayer, "flat", flat)
        with runtime.apply(model, sched):
            runs[flat] = model.generate(
                ids, attention_mask=mask, max_new_tokens=21, return_dict_in_generate=True, **GREEDY
            )
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    simple, flat = runtime.cache_of(runs[False]), runtime.cache_of(runs[True])
    ragged = [i for i, layer in enumerate(flat.layers) if isinstance(layer, RaggedLayer)]
    assert ragged and all(flat.layers[i]._flat is not None for i in ragged)  # the flat path ran
    for i in range(len(flat.layers)):
        for a, b in zip(runtime.inspect.kept(simple, i), runtime.inspect.kept(flat, i), strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions), f"layer {i}"
            assert torch.equal(a.valid, b.valid), f"layer {i}"
    assert runtime.kv_bytes(flat) == runtime.kv_bytes(simple)


@pytest.mark.parametrize("mode", ["evict", "drop"])
def test_a_trim_step_frees_the_old_flat_buffers(mode):
    """Generation ending on a trim step: every split layer was packed again right after its trims, so it holds no
    stale flat buffer beside its heads' new slots, and kv_bytes counts all it holds."""
    model = tiny_model("llama", kv_heads=2)
    sched = head_schedule(layer_heads(model), prefill_mode=mode, decode=runtime.Decode(interval=8))
    ids, mask = left_pad(prompts())
    with runtime.apply(model, sched):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=17, return_dict_in_generate=True, **GREEDY)
    cache = runtime.cache_of(out)  # 16 decode steps: the last one trimmed every compressed layer
    ragged = [layer for layer in cache.layers if isinstance(layer, RaggedLayer)]
    assert ragged
    for layer in ragged:
        assert layer._in_flat()
        held = sum(t.numel() * t.element_size() for t in (layer._flat["keys"], layer._flat["values"]))
        assert layer.kv_nbytes() == held


def test_batch_operations_move_each_rows_slots_and_queries():
    """Beam search's batch operations on a decoded cache with split layers (flat buffers in use): a row reordering
    moves every layer's slots and recent queries with their row, and the next step's logits follow; repeating
    rows then selecting one of each gives the cache back."""
    model = tiny_model("llama", kv_heads=2)
    sched = head_schedule(layer_heads(model), decode=runtime.Decode(interval=8))
    ids, mask = left_pad(prompts())

    def decoded():
        with runtime.apply(model, sched):
            return model.generate(ids, attention_mask=mask, max_new_tokens=12, return_dict_in_generate=True, **GREEDY)

    runs = [decoded() for _ in range(3)]
    base, swapped, cycled = (runtime.cache_of(r) for r in runs)
    swap = torch.tensor([1, 0])
    swapped.reorder_cache(swap)
    cycled.batch_repeat_interleave(2)
    cycled.batch_select_indices(torch.tensor([0, 2]))
    n = model.config.num_hidden_layers
    assert any(isinstance(layer, RaggedLayer) for layer in base.layers)
    for i in range(n):
        for ref, other, order in ((base, swapped, swap), (base, cycled, torch.tensor([0, 1]))):
            for a, b in zip(runtime.inspect.kept(ref, i), runtime.inspect.kept(other, i), strict=True):
                for x, y in ((a.keys, b.keys), (a.positions, b.positions), (a.valid, b.valid)):
                    assert torch.equal(x[order], y), f"layer {i}"
            qa, qb = runtime.inspect.recent_queries(ref, i), runtime.inspect.recent_queries(other, i)
            assert torch.equal(qa.queries[order], qb.queries) and torch.equal(qa.positions[order], qb.positions)
    step = runs[0].sequences[:, -1:]
    with runtime.apply(model, sched), torch.no_grad():  # as generate runs, which made the caches
        want = model(step, cache=base, attention_mask=torch.ones_like(step)).logits
        got = model(step[swap], cache=swapped, attention_mask=torch.ones_like(step)).logits
    torch.testing.assert_close(got, want[swap])
