"""`Evaluator`'s shortcut for single-layer measurements: running the continuation from the compressed layer on,
from the full-cache hidden states there, gives the same scores as the whole model (it is exact, not close)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import runtime
from calibrate.scoring import Evaluator, Example, Reference, one_part_compressed, token_scores
from runtime.schedule import Schedule


def examples(n: int = 3, context: int = 80, continuation: int = 12, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (context + continuation,), generator=g)
        out.append(Example(ids[:context], ids[context:], torch.ones(continuation, dtype=torch.bool)))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_from_layer_equals_the_whole_model(family):
    model = tiny_model(family, kv_heads=2)
    ev = Evaluator(model, examples(), query_window=16, sinks=2, batch_size=2)
    base = Schedule(ratios=[1.0] * ev.layers, window=8, sinks=2)
    compressible = [c for c, _ in runtime.families.layer_plan(model)]
    units = [(layer, h) for layer in range(ev.layers) if compressible[layer] for h in (None, 1)]
    assert len(units) >= 4
    for layer, head in units:
        sched = one_part_compressed(base, layer, head or 0, 0.2, 2 if head is not None else None)
        whole, short = ev.rows(sched), ev.rows(sched, from_layer=layer)
        for a, b in zip(whole, short, strict=True):
            torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=0)
            torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=0)
        assert sum(float(r.kl.sum()) for r in whole) > 0  # the unit really was compressed
    # the model is whole again afterwards: layers below run as before
    assert ev.score(base).kl == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forks_that_append_into_the_reserved_room_equal_forks_that_copy(family, monkeypatch):
    """Scoring forks write their continuation into room the full caches reserved (`fork(into_room=True)`); one
    after the other they give exactly the scores of forks that copy, and the full caches keep their own slots."""
    model = tiny_model(family, kv_heads=2)
    ev = Evaluator(model, examples(), query_window=16, sinks=2, batch_size=2)

    def contents(cache):
        return [(k.keys.clone(), k.values.clone(), k.positions.clone()) for i in range(ev.layers)
                for k in runtime.inspect.kept(cache, i)]  # fmt: skip

    before = [contents(c) for c in ev.caches]
    base = Schedule(ratios=[1.0] * ev.layers, window=8, sinks=2)
    ratios = [0.3 if c else 1.0 for c, _ in runtime.families.layer_plan(model)]
    scheds = [
        (base, 0),
        (base.with_ratios(ratios), 0),
        (one_part_compressed(base, 1, 1, 0.2, 2), 1),
        (one_part_compressed(base, 2, 0, 0.2, None), 2),
    ]
    results = {}
    for into_room in (False, True):  # copying first: forks into room that damaged the full caches would show
        monkeypatch.setattr(Evaluator, "into_room", into_room)
        results[into_room] = [ev.rows(s, from_layer=f) for s, f in scheds for _ in range(2)]  # each twice
    for a_rows, b_rows in zip(results[True], results[False], strict=True):
        for a, b in zip(a_rows, b_rows, strict=True):
            torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=0)
            torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=0)
    assert sum(float(r.kl.sum()) for r in results[True][2]) > 0
    for cache, kept in zip(ev.caches, before, strict=True):
        for now, then in zip(contents(cache), kept, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(now, then, strict=True))


def test_a_fork_into_room_writes_the_room_and_not_the_source_slots():
    """`reserve` then `fork(into_room=True)`: the fork's append lands in the source's buffer (no copy), the
    source still holds its own slots and length; a plain fork's append copies."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    ones = Schedule(ratios=[1.0] * model.config.num_hidden_layers, window=4, sinks=2)
    with runtime.apply(model, ones), torch.inference_mode():
        src = runtime.cache_of(model(ids))
        src.reserve(8)
        (held,) = runtime.inspect.kept(src, 0)
        keys = held.keys.clone()
        for into_room in (False, True):  # copying first: forks into room that damaged the full caches would show
            fork = src.fork(ones, into_room=into_room)
            model(ids[:, :5], cache=fork)
            (mine,) = runtime.inspect.kept(fork, 0)
            assert mine.keys.shape[2] == 25
            assert (mine.keys.untyped_storage().data_ptr() == held.keys.untyped_storage().data_ptr()) == into_room
            (held,) = runtime.inspect.kept(src, 0)
            assert held.keys.shape[2] == 20 and torch.equal(held.keys, keys)
            assert src.stored_lengths() == [20] * len(src.layers)


def test_from_layer_refuses_a_schedule_that_compresses_below_it():
    model = tiny_model("llama")
    ev = Evaluator(model, examples(n=2), query_window=16, sinks=2)
    ratios = [1.0] * ev.layers
    ratios[0] = 0.5
    with pytest.raises(ValueError, match="keeps every layer below it"):
        ev.rows(Schedule(ratios=ratios, window=8, sinks=2), from_layer=2)


def test_from_layer_equals_the_whole_model_on_smollm2(smollm2, shared_data):
    """The same on the real model, for a few layer and head units (one window of 256 + 32 tokens)."""
    from calibrate import data, tasks

    model, tok = smollm2
    stream = data.token_stream(tok, data.load_texts([shared_data / "tinyshakespeare"]))
    ev = Evaluator(model, tasks.text_examples(data.cut_windows(stream, 256 + 32, 1), 256), query_window=32)
    base = Schedule(ratios=[1.0] * ev.layers, window=32, sinks=4)
    for layer, head in [(3, None), (17, None), (8, 2), (29, 0)]:
        sched = one_part_compressed(base, layer, head or 0, 0.1, 3 if head is not None else None)
        whole, short = ev.rows(sched), ev.rows(sched, from_layer=layer)
        torch.testing.assert_close(short[0].kl, whole[0].kl, rtol=0, atol=0)
        assert float(whole[0].kl.sum()) > 0


def _naive_rows(model, ev: Evaluator, schedule: Schedule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(KL, NLL) per scored token the simple way: the whole continuation, every position's logits, the KL as
    the difference of two log-softmaxes in float64."""

    def logprobs(b, sched, cache):
        cont = torch.stack([ev.examples[j].continuation for j in ev.batches[b]])
        with runtime.apply(model, sched):
            return torch.log_softmax(model(cont, cache=cache).logits.double(), -1)

    out = []
    for b, idx in enumerate(ev.batches):
        ref = logprobs(b, ev.probe, ev.caches[b].fork(ev.probe))
        logp = logprobs(b, schedule, ev.compressed_cache(b, schedule))
        for row, j in enumerate(idx):
            ex = ev.examples[j]
            sel = ex.scored[1:]
            lp, rp = logp[row, :-1][sel], ref[row, :-1][sel]
            out.append(((rp.exp() * (rp - lp)).sum(-1), -lp.gather(-1, ex.continuation[1:][sel][:, None])[:, 0]))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_scoring_only_scored_positions_equals_scoring_the_whole_continuation(family):
    """The LM head runs only where a row scores and the continuation stops at the last such token: the same
    scores as the whole continuation with every position's logits (rows scored at different places, one not
    at all, the tail never)."""
    model = tiny_model(family, kv_heads=2)
    exs = examples(n=5, continuation=16, seed=1)
    masks = [[3, 4, 5], [6, 9], [], [2, 3, 4, 5, 6, 7, 8], [1, 11]]
    for ex, scored in zip(exs, masks, strict=True):
        ex.scored = torch.zeros(16, dtype=torch.bool)
        ex.scored[scored] = True
    ev = Evaluator(model, exs, query_window=16, sinks=2, batch_size=2)
    assert [int(p[-1]) for p in ev.positions] == [8, 7, 10]  # batches stop short of the 16 tokens
    sched = Schedule(ratios=[0.3] * ev.layers, window=8, sinks=2)
    rows = ev.rows(sched)
    for row, (kl, nll) in zip(rows, _naive_rows(model, ev, sched), strict=True):
        torch.testing.assert_close(row.kl.double(), kl, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(row.nll.double(), nll, rtol=1e-4, atol=1e-6)
    assert sum(r.kl.numel() for r in rows) == sum(len(m) - (0 in m) for m in masks)
    assert sum(float(r.kl.sum()) for r in rows) > 0


def test_scoring_only_scored_positions_on_smollm2(smollm2):
    """The same on the real model with its retrieval tasks (a few answer digits scored of 48 tokens)."""
    from calibrate import tasks

    model, tok = smollm2
    ev = Evaluator(model, tasks.make_tasks(tok, 3, 256, 48, seed=0), query_window=32, batch_size=2)
    assert all(int(p[-1]) < 47 for p in ev.positions)  # the filler after the answer is never fed
    heads = [[0.1, 0.5, 0.3] for _ in range(ev.layers)]
    sched = Schedule(ratios=[1.0] * ev.layers, window=32, sinks=4).with_head_ratios(heads)
    rows = ev.rows(sched)
    for row, (kl, nll) in zip(rows, _naive_rows(model, ev, sched), strict=True):
        torch.testing.assert_close(row.kl.double(), kl, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(row.nll.double(), nll, rtol=1e-4, atol=1e-5)
    assert sum(float(r.kl.sum()) for r in rows) > 0


def test_token_scores_keep_the_digits_of_tiny_kls():
    """KL and NLL from the logits' change against float64 ground truth, for perturbations that give KLs of
    1e-10..1e-1 nats (a single head's curve reaches 1e-7): within 0.5% + 1e-10 nats, where differencing two
    float32 log-softmaxes is off by ~1e-7 nats, more than the smallest KLs themselves."""
    g = torch.Generator().manual_seed(0)
    ref_logits = 3 * torch.randn(2, 40, 5000, generator=g)
    scale = torch.logspace(-5, -0.5, 40)[None, :, None]
    logits = ref_logits + scale * torch.randn(2, 40, 5000, generator=g)
    targets = torch.randint(0, 5000, (2, 40), generator=g)
    kl, nll, top = token_scores(logits, Reference.of(ref_logits), targets, argmax=True)
    r64, z64 = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    kl64 = (r64.exp() * (r64 - z64)).sum(-1)
    assert float(kl64.min()) < 1e-9 and float(kl64.max()) > 1e-2
    torch.testing.assert_close(kl.double(), kl64, rtol=5e-3, atol=1e-10)
    torch.testing.assert_close(nll.double(), -z64.gather(-1, targets[..., None])[..., 0], rtol=1e-6, atol=1e-5)
    assert torch.equal(top, logits.argmax(-1))
    r32, z32 = torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1)
    naive = (r32.exp() * (r32 - z32)).sum(-1).double()
    assert float((naive - kl64).abs().max()) > 1e-8  # the float32 difference of log-softmaxes is not that close


def test_the_calibration_tasks_score_in_one_batch_as_in_smaller_ones(smollm2):
    """`CalibrationSet.evaluators` scores the default 6 retrieval tasks in one batch (cheaper than 4 + 2); every
    row's scores are those of the smaller batches to float rounding (the batches' shapes differ; 2e-4 relative
    here), per layer and per head, from the compressed layer on."""
    from calibrate.data import CalibrationSet
    from calibrate.settings import Settings

    model, tok = smollm2
    data = CalibrationSet(tok, Settings(context_length=256, calib_windows=1, valid_windows=1))
    _, tasks = data.evaluators(model, "calibration", sinks=4)
    assert len(tasks.examples) == 6 and len(tasks.batches) == 1
    small = Evaluator(model, data.calib_tasks, query_window=64, sinks=4, batch_size=4)
    assert len(small.batches) == 2
    base = Schedule(ratios=[1.0] * small.layers, window=32, sinks=4)
    for layer, head in ((3, None), (20, 2)):
        kv_heads = runtime.families.model_info(model).num_kv_heads
        sched = one_part_compressed(base, layer, head or 0, 0.05, kv_heads if head is not None else None)
        one, two = tasks.rows(sched, from_layer=layer), small.rows(sched, from_layer=layer)
        for a, b in zip(one, two, strict=True):
            torch.testing.assert_close(a.kl, b.kl, rtol=1e-3, atol=1e-8)
            torch.testing.assert_close(a.nll, b.nll, rtol=1e-4, atol=1e-5)
            assert a.correct == b.correct
        assert sum(float(r.kl.sum()) for r in one) > 0
