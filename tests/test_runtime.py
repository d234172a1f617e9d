"""Runtime correctness on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

import runtime
import runtime.inspect
from runtime import Decode, Schedule, Selection

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def schedule_for(net, ratios=None, **kw) -> Schedule:
    n = net.config.num_hidden_layers
    if ratios is None:
        ratios = [max(0.2, 1.0 - 0.25 * i) for i in range(n)]  # non-increasing
    kw.setdefault("window", 8)
    kw.setdefault("sinks", 2)
    return Schedule(ratios=ratios, **kw)


def prompts(seed=1, lengths=(70, 52)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, n), generator=g) for n in lengths]


def left_pad(rows):
    n = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1] :] = r[0]
        mask[i, n - r.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_ones_reproduces_stock_generation(family, attn):
    model = tiny_model(family)
    model.set_attn_implementation(attn)
    ids, mask = left_pad(prompts())
    stock = model.generate(ids, attention_mask=mask, max_new_tokens=24, **GREEDY)
    with runtime.apply(model, schedule_for(model, [1.0] * model.config.num_hidden_layers), attn=attn):
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=24, **GREEDY)
    assert torch.equal(stock, ours)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["evict", "drop"])
@pytest.mark.parametrize("per_head, decode", [(True, Decode()), (False, Decode()), (True, Decode(8, stagger=True))])
def test_padded_batch_equals_each_row_alone(family, mode, per_head, decode):
    """Also with trims every 8 tokens staggered over the layers (4 trims per layer in the 40 new tokens)."""
    model = tiny_model(family)
    sched = schedule_for(model, prefill_mode=mode, selection=Selection(per_head=per_head), decode=decode)
    rows = prompts()
    ids, mask = left_pad(rows)
    with runtime.apply(model, sched):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=40, return_dict_in_generate=True, **GREEDY)
        batch_new = out.sequences[:, ids.shape[1] :]
        for i, row in enumerate(rows):
            alone = model.generate(row, attention_mask=torch.ones_like(row), max_new_tokens=40, **GREEDY)
            assert torch.equal(batch_new[i], alone[0, row.shape[1] :]), f"row {i} differs"
    # rows of different lengths keep different numbers of tokens
    layer = runtime.cache_of(out).layers[-1]
    kept = layer.valid[:, 0].sum(-1)
    assert kept[0] > kept[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_lengths_follow_schedule_after_prefill(family):
    model = tiny_model(family)
    sched = schedule_for(model)
    ids = prompts(lengths=(90,))[0]
    with runtime.apply(model, sched):
        out = model(ids)
    cache = runtime.cache_of(out)
    expected = sched.kept_tokens(90)
    plan = runtime.families.layer_plan(model)
    for i, (layer, (compressible, window)) in enumerate(zip(cache.layers, plan, strict=True)):
        if compressible:
            assert layer.stored() == expected[i], f"layer {i}"
            assert bool(layer.valid.all())
        else:
            assert layer.stored() == window - 1  # sliding layers keep their own window
    # kv_bytes counts what is allocated; right after a prompt no layer holds spare room
    assert runtime.kv_bytes(cache) == sum(2 * t.keys.numel() * t.keys.element_size() for t in cache.layers)
    assert all(layer._keys.shape[2] == layer.stored() for layer in cache.layers)


@pytest.mark.parametrize("mode", ["evict", "drop"])
def test_drop_mode_computes_fewer_tokens_in_deeper_layers(mode):
    model = tiny_model("llama")
    sched = schedule_for(model, prefill_mode=mode)
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for layer in model.model.layers]
    with runtime.apply(model, sched):
        model(prompts(lengths=(90,))[0])
    for h in hooks:
        h.remove()
    if mode == "evict":
        assert seen == [90] * 4
    else:  # layer l+1 receives only what layers >= l+1 may keep
        assert seen == [90] + sched.kept_tokens(90)[1:]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_continuation_in_one_chunk_equals_token_by_token(family):
    model = tiny_model(family)
    sched = schedule_for(model, decode=Decode(interval=64))
    context, cont = prompts(lengths=(80, 20))
    with runtime.apply(model, sched):
        c1 = runtime.cache_of(model(context))
        chunk = model(cont, cache=c1).logits[0]
        c2 = runtime.cache_of(model(context))
        steps = torch.cat([model(cont[:, i : i + 1], cache=c2).logits[0] for i in range(cont.shape[1])])
    torch.testing.assert_close(chunk, steps, rtol=1e-4, atol=1e-4)


def test_sinks_and_window_survive_long_generation():
    model = tiny_model("llama")
    sched = schedule_for(model, ratios=[0.5, 0.3, 0.2, 0.1])
    ids = prompts(lengths=(64,))[0]
    with runtime.apply(model, sched):
        out = model.generate(ids, max_new_tokens=512, min_new_tokens=512, return_dict_in_generate=True, **GREEDY)
    total = 64 + 512 - 1  # the last token is never fed back
    for i, layer in enumerate(runtime.cache_of(out).layers):
        pos = layer.pos[0]
        for h in range(pos.shape[0]):
            kept = set(pos[h][layer.valid[0, h]].tolist())
            assert set(range(sched.sinks)) <= kept, f"layer {i} lost a sink"
            assert set(range(total - sched.window, total)) <= kept, f"layer {i} lost its recent window"
        # bounded: about ratio x tokens seen, never collapsing to the window
        target = runtime.schedule.kept_tokens(sched.ratios[i], total, sched.sinks, sched.window)
        assert target <= layer.stored() < target + sched.decode.interval
        assert layer.stored() > sched.sinks + sched.window
        # what is allocated stays bounded too: the slots of one interval at most beyond the target
        assert layer._keys.shape[2] <= target + sched.decode.interval


def test_hard_cap_bounds_every_layer():
    model = tiny_model("llama")
    sched = schedule_for(model, ratios=[1.0, 0.9, 0.9, 0.9], decode=Decode(interval=8, max_tokens=60))
    with runtime.apply(model, sched):
        out = model.generate(prompts(lengths=(50,))[0], max_new_tokens=100, return_dict_in_generate=True, **GREEDY)
    lengths = runtime.cache_of(out).stored_lengths()
    assert lengths[0] == 50 + 99
    assert all(n < 60 + 8 for n in lengths[1:])


def test_apply_restores_the_model():
    model = tiny_model("llama")
    ids = prompts()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stock = model.generate(ids, max_new_tokens=10, **GREEDY)
    with runtime.apply(model, schedule_for(model, prefill_mode="drop")):
        model.generate(ids, max_new_tokens=10, **GREEDY)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(model)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.generate(ids, max_new_tokens=10, **GREEDY), stock)


def test_restores_even_when_the_block_raises():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError), runtime.apply(model, schedule_for(model, prefill_mode="drop")):
        raise RuntimeError("boom")
    assert "forward" not in vars(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_shrinks(dtype):
    model = tiny_model("llama", dtype=dtype)
    sched = schedule_for(model)
    ids, mask = left_pad(prompts(lengths=(300, 250)))  # long enough that the spare room of a layer is small
    with runtime.apply(model, sched):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, return_dict_in_generate=True, **GREEDY)
    assert runtime.cache_of(out).layers[0].keys.dtype == dtype
    assert runtime.kv_bytes(runtime.cache_of(out)) < sum(
        2 * 2 * 2 * (ids.shape[1] + 7) * 16 * dtype.itemsize for _ in range(4)
    )


def test_unsupported_model_and_wrong_schedule_get_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with (
        pytest.raises(runtime.UnsupportedModelError, match="supported families: Llama"),
        runtime.apply(gpt2, Schedule(ratios=[1.0, 1.0])),
    ):
        pass
    model = tiny_model("llama")
    with pytest.raises(runtime.ScheduleError, match="4 layers"), runtime.apply(model, Schedule(ratios=[0.5] * 3)):
        pass
    other = tiny_model("qwen2")
    calibrated = schedule_for(model, model=runtime.model_info(model, "tiny-llama"))
    with pytest.raises(runtime.ScheduleError, match="calibrated for 'tiny-llama'"), runtime.apply(other, calibrated):
        pass
    with runtime.apply(model, calibrated), pytest.raises(ValueError, match="use_cache=False"):
        model(prompts()[0], use_cache=False)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forked_probe_compressed_now_equals_a_real_prefill(family):
    """What calibration scores (prefill once, fork, compress) is what the runtime does after a real prefill."""
    model = tiny_model(family)
    n = model.config.num_hidden_layers
    target = schedule_for(model, selection=Selection(pooling="avg", pool_kernel=5))
    probe = Schedule(ratios=[1.0] * n, window=16, sinks=target.sinks)
    ctx, cont = prompts(lengths=(80, 12))
    with runtime.apply(model, target):
        real = runtime.cache_of(model(ctx))
        kept = [(layer.pos, layer.valid) for layer in real.layers]  # before the continuation extends them
        expected = model(cont, cache=real).logits
    with runtime.apply(model, probe):
        base = runtime.cache_of(model(ctx))
    forked = base.fork(target)
    forked.compress_now()
    for (pos, valid), b in zip(kept, forked.layers, strict=True):
        assert torch.equal(pos, b.pos) and torch.equal(valid, b.valid)
    with runtime.apply(model, target):
        got = model(cont, cache=forked).logits
    torch.testing.assert_close(got, expected)
    assert base.stored_lengths() == [80 if c else w - 1 for c, w in runtime.families.layer_plan(model)]


def test_recent_and_random_selection_baselines():
    model = tiny_model("llama")
    ids = prompts(lengths=(100,))[0]
    recent = schedule_for(model, ratios=[0.2] * 4, selection=Selection(method="recent"))
    with runtime.apply(model, recent):
        cache = runtime.cache_of(model(ids))
    kept = cache.layers[0].pos[0, 0].tolist()
    k = recent.kept_tokens(100)[0]
    assert kept == [0, 1] + list(range(100 - (k - 2), 100))  # sinks + the newest tokens (StreamingLLM)
    rnd = schedule_for(model, ratios=[0.2] * 4, selection=Selection(method="random"))
    with runtime.apply(model, rnd):
        a = runtime.cache_of(model(ids)).layers[0].pos
        b = runtime.cache_of(model(ids)).layers[0].pos
    assert torch.equal(a, b) and a[0, 0].tolist() != kept  # repeatable, and not the recency choice


def test_runtime_package_imports_nothing_from_the_calibration_side():
    """runtime is what production installs: it must not depend on calibrate, optuna, datasets or scipy."""
    import ast
    from pathlib import Path

    banned = {"calibrate", "optuna", "datasets", "scipy"}
    for path in (Path(runtime.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_forks_and_their_source_never_write_into_each_other():
    """Layers append into spare room; forks share their source's buffers, so an append there must copy first."""
    model = tiny_model("llama")
    ones = Schedule(ratios=[1.0] * model.config.num_hidden_layers, window=16, sinks=4)
    ctx, a, b = prompts(lengths=(40, 6, 5))
    with runtime.apply(model, ones):
        base = runtime.cache_of(model(ctx))
        first, second = base.fork(ones), base.fork(ones)
        model(a, cache=first)
        model(b, cache=second)
        model(a[:, :3], cache=base)
        got = {
            "first": model(b, cache=first).logits,
            "second": model(a, cache=second).logits,
            "base": model(b, cache=base).logits,
        }
        expected = {
            "first": model(torch.cat([ctx, a, b], 1)).logits[:, -b.shape[1] :],
            "second": model(torch.cat([ctx, b, a], 1)).logits[:, -a.shape[1] :],
            "base": model(torch.cat([ctx, a[:, :3], b], 1)).logits[:, -b.shape[1] :],
        }
    for name, logits in got.items():
        torch.testing.assert_close(logits, expected[name], msg=name)


def test_choose_keeps_each_heads_own_count():
    """keep [B, H]: every head keeps its own count of its best slots; the surplus of the largest is invalid."""
    from runtime import selection

    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]]])  # [B=1, H=2, T=5]
    valid = torch.ones_like(scores, dtype=torch.bool)
    protect = torch.zeros_like(valid)
    idx, kept = selection.choose(scores, valid, protect, torch.tensor([[1, 3]]), k_max=3)
    chosen = [[int(i) for i, k in zip(row_i, row_k) if k] for row_i, row_k in zip(idx[0], kept[0])]
    assert chosen == [[0], [2, 3, 4]]
    # a [B] count is every head's count, as before
    idx, kept = selection.choose(scores, valid, protect, torch.tensor([2]), k_max=2)
    assert idx[0].tolist() == [[0, 2], [3, 4]] and bool(kept.all())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["evict", "drop"])
def test_a_padded_prompt_builds_one_mask_per_window_not_per_layer(family, mode, monkeypatch):
    """Every layer of a fresh prompt holds the pass's own tokens: its mask is built once per window (Gemma 3: its
    sliding and its full layers), equal to what each layer would build itself. In drop mode the tokens that go on
    change after each gather, and so does the mask."""
    from runtime.layer import PyramidLayer

    model = tiny_model(family)
    sched = schedule_for(model, prefill_mode=mode)
    ids, mask = left_pad(prompts())
    seen = []
    original = PyramidLayer.attention_mask

    def spy(self, step, heads):
        m = original(self, step, heads)
        if step.prefill and m is not None:
            built = dict(step.masks)
            step.masks.clear()
            assert torch.equal(original(self, step, heads), m)  # built anew, it is the same mask
            step.masks.update(built)
            seen.append((self.sliding_window, m))
        return m

    monkeypatch.setattr(PyramidLayer, "attention_mask", spy)
    with runtime.apply(model, sched):
        model(ids, attention_mask=mask)
    windows = {w for w, _ in seen}
    assert len(seen) == model.config.num_hidden_layers and len(windows) == (2 if family == "gemma3" else 1)
    distinct = len({id(m) for _, m in seen})
    assert distinct == len(windows) if mode == "evict" else distinct > len(windows)


def _decode_steps(model, ids, mask, steps, pad_at, cache=None):
    """Feed `steps` greedy tokens one call at a time (explicit positions); row 0's token at step `pad_at` is
    padding (mask 0). Returns each step's logits [B, V] and the cache."""
    out = model(ids, attention_mask=mask, cache=cache)
    cache, logits = runtime.cache_of(out), []
    nxt = out.logits[:, -1:].argmax(-1)
    for step in range(steps):
        col = torch.ones(ids.shape[0], 1, dtype=mask.dtype)
        if step == pad_at:
            col[0] = 0
        mask = torch.cat([mask, col], 1)
        pos = torch.full((ids.shape[0], 1), mask.shape[1] - 1)
        out = model(nxt, attention_mask=mask, position_ids=pos, cache=cache)
        logits.append(out.logits[:, -1])
        nxt = out.logits[:, -1:].argmax(-1)
    return logits, cache


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_padding_token_while_decoding_is_masked_from_the_next_step_on(family):
    """A decode step learns that its token is padding without waiting for the device; the next steps must mask
    it as the stock model does (all-ones schedule), and under a compressed per-head schedule with trims every 4
    tokens give what waiting for the device at once gives."""
    from transformers import DynamicCache

    model = tiny_model(family, kv_heads=2)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    n = model.config.num_hidden_layers
    with torch.inference_mode():
        if family == "llama":  # (Gemma 3's stock sliding layers treat a padding slot inside the window otherwise)
            stock, _ = _decode_steps(model, ids, mask, 8, pad_at=2, cache=DynamicCache(config=model.config))
            with runtime.apply(model, schedule_for(model, [1.0] * n)):
                ours, _ = _decode_steps(model, ids, mask, 8, pad_at=2)
            for step in range(3, 8):  # the padding token's own logits (step 2, row 0) are never read
                torch.testing.assert_close(ours[step], stock[step], rtol=1e-4, atol=1e-4)
        shares = [[0.3, 0.6] for _ in range(n)]
        sched = schedule_for(model, decode=Decode(interval=4)).with_head_ratios(shares)
        runs = {}
        for defer in (True, False):
            runtime.PyramidCache.defer_validity = defer
            try:
                with runtime.apply(model, sched):
                    runs[defer] = _decode_steps(model, ids, mask, 12, pad_at=5)
            finally:
                runtime.PyramidCache.defer_validity = True
    (late, late_cache), (now, now_cache) = runs[True], runs[False]
    # at step 5 row 1 ran without a mask in one run and with one in the other: equal up to rounding
    for step in [s for s in range(12) if s != 5]:
        torch.testing.assert_close(late[step], now[step], rtol=1e-5, atol=1e-5)
    for layer in range(n):
        for a, b in zip(runtime.inspect.kept(late_cache, layer), runtime.inspect.kept(now_cache, layer)):
            assert torch.equal(a.valid, b.valid) and torch.equal(a.positions, b.positions)
    assert not all(bool(k.valid.all()) for k in runtime.inspect.kept(late_cache, 0))  # the pad slot is held


def test_a_plain_decode_step_reads_nothing_back_from_the_device(monkeypatch):
    """No host sync on a decode step (a left-padded batch, per-head shares, no trim due): the only read is the
    previous step's padding flag, which on CUDA waits for nothing but its own early copy (`LateFlag`)."""
    from runtime.cache import LateFlag

    model = tiny_model("llama", kv_heads=2)
    n = model.config.num_hidden_layers
    sched = schedule_for(model).with_head_ratios([[0.4, 0.7] for _ in range(n)])
    ids, mask = left_pad(prompts())
    reads = []
    names = ["__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy"]
    originals = {name: getattr(torch.Tensor, name) for name in names}
    trapping = [False]

    def trap(name):
        def read(self, *args, **kwargs):
            if trapping[0]:
                reads.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    flag_read = LateFlag.read

    def untrapped_read(self):
        was, trapping[0] = trapping[0], False
        try:
            return flag_read(self)
        finally:
            trapping[0] = was

    for name in names:
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    monkeypatch.setattr(LateFlag, "read", untrapped_read)
    with runtime.apply(model, sched), torch.inference_mode():
        out = model(ids, attention_mask=mask)
        cache, nxt = runtime.cache_of(out), out.logits[:, -1:].argmax(-1)
        for _ in range(4):  # the schedule trims every 32 tokens: none of these steps trims
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            trapping[0] = True
            out = model(nxt, attention_mask=mask, cache=cache)
            trapping[0] = False
            nxt = out.logits[:, -1:].argmax(-1)
    assert reads == []
    runtime.PyramidCache.defer_validity = False  # the check can fail: waiting at once is a read
    try:
        with runtime.apply(model, sched), torch.inference_mode():
            trapping[0] = True
            model(nxt, attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
            trapping[0] = False
    finally:
        runtime.PyramidCache.defer_validity = True
    assert reads == ["__bool__"]


def test_cache_of_reads_the_cache_of_a_call_and_of_generate_without_the_deprecated_name(monkeypatch):
    from transformers.utils import generic

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    model = tiny_model("llama")
    ids = prompts(lengths=(40,))[0]
    with runtime.apply(model, schedule_for(model)), torch.inference_mode():
        cache = runtime.cache_of(model(ids))
        gen = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **GREEDY)
    assert isinstance(cache, runtime.PyramidCache) and isinstance(runtime.cache_of(gen), runtime.PyramidCache)
    assert runtime.kv_bytes(cache) > 0
    with torch.inference_mode():
        assert runtime.cache_of(model(ids, use_cache=False)) is None
    assert not [m for m in warned if "deprecated" in m]
