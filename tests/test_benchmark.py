"""`calibrate bench` on tiny random models: the baselines are what they claim to be; no timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache, StaticCache

import runtime
from calibrate import benchmark as bench
from runtime import Decode, Schedule
from runtime.schedule import kept_tokens

CONTEXT, NEW, INTERVAL = 96, 12, 4


def prompt_batch(rows: int = 2, tokens: int = CONTEXT, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded equal-length prompts, as the bench uses them (mask all ones)."""
    ids = torch.randint(3, 128, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def tiny_schedule() -> Schedule:
    return Schedule(ratios=[1.0, 0.5, 0.3, 0.3], window=8, sinks=2, decode=Decode(interval=INTERVAL))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def result(llama) -> dict:
    ids, mask = prompt_batch()
    return bench.compare(llama, ids, mask, tiny_schedule(), new_tokens=NEW, repeats=1)


def greedy_tokens(model, ids, mask, cache, new_tokens: int = 16) -> tuple[torch.Tensor, bench.RunStats]:
    tokens: list[torch.Tensor] = []
    stats = bench.greedy_run(model, ids, mask, new_tokens, cache, tokens_out=tokens)
    return torch.cat(tokens, dim=1), stats


@pytest.mark.parametrize("family, seed", [("llama", 1), ("mistral", 0)])  # mistral: prompt past its sliding window
def test_static_cache_decodes_the_same_greedy_tokens_as_dynamic_cache(family, seed):
    model = tiny_model(family, seed=seed)
    ids, mask = prompt_batch(tokens=60)
    dynamic, d = greedy_tokens(model, ids, mask, DynamicCache(config=model.config))
    static, s = greedy_tokens(model, ids, mask, StaticCache(config=model.config, max_cache_len=60 + 15))
    assert dynamic.shape == (2, 16) and len(set(dynamic.flatten().tolist())) > 4  # not a degenerate repeat
    assert torch.equal(static, dynamic)
    assert s.decode_steps == d.decode_steps == 15 and s.trim_steps == d.trim_steps == 0
    if family == "llama":  # sized exactly for what the run writes: it holds what DynamicCache holds at the end
        assert s.kv_bytes_end == d.kv_bytes_end


@pytest.mark.parametrize("stagger", [False, True])
def test_trim_steps_are_where_the_cache_shrinks(llama, stagger):
    """The documented step rule matches the runtime: every compressed layer grows one slot per plain step and holds
    fewer tokens after every step the rule says it trims (read through runtime.inspect only). Staggered, the layers
    trim on different steps, and no step trims them all."""
    from runtime import inspect

    ids, mask = prompt_batch(rows=1)
    schedule = tiny_schedule()
    schedule = dataclasses.replace(schedule, decode=dataclasses.replace(schedule.decode, stagger=stagger))
    layers = llama.config.num_hidden_layers
    pos = torch.arange(CONTEXT).unsqueeze(0)
    with torch.inference_mode(), runtime.apply(llama, schedule):
        out = llama(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.cache
        kept = [[float(inspect.kept_per_row(cache, i)) for i in range(layers)]]
        for step in range(1, 3 * INTERVAL + 1):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            nxt = out.logits[:, -1:].argmax(-1)
            out = llama(input_ids=nxt, attention_mask=mask, position_ids=pos[:, -1:] + step, cache=cache)
            kept.append([float(inspect.kept_per_row(cache, i)) for i in range(layers)])
    compressed = [i for i in range(layers) if schedule.ratios[i] < 1.0]
    assert len(compressed) >= 2
    shrunk = 0
    for step in range(1, len(kept)):
        for i in compressed:
            if schedule.decode.trims_after(step, i, layers):  # back to its target (a layer within it stays)
                target = kept_tokens(schedule.ratios[i], CONTEXT + step, schedule.sinks, schedule.window)
                assert kept[step][i] == min(target, kept[step - 1][i] + 1), (step, i, kept)
                shrunk += kept[step][i] < kept[step - 1][i]
            else:
                assert kept[step][i] == kept[step - 1][i] + 1, (step, i, kept)
        trimming = [i for i in compressed if schedule.decode.trims_after(step, i, layers)]
        assert bench.is_trim_step(step, schedule, layers) == bool(trimming)
        if stagger:
            assert len(trimming) < len(compressed)
    assert shrunk >= 2 * len(compressed)
    assert not bench.is_trim_step(INTERVAL, None, layers)


def test_precut_reference_holds_the_schedules_share_of_the_prompt(llama, result):
    schedule = tiny_schedule()
    keep = round(schedule.kv_fraction(CONTEXT) * CONTEXT)
    assert 0 < keep < CONTEXT and bench.precut_tokens(schedule, CONTEXT) == keep
    ids, mask = prompt_batch()
    cut_ids, cut_mask = bench.precut_inputs(ids, mask, schedule)
    assert torch.equal(cut_ids, ids[:, -keep:]) and cut_mask.shape == (2, keep)

    precut = result["configs"]["precut"]
    assert result["precut_tokens"] == precut["prompt_tokens"] == keep
    assert result["configs"]["stock_static"]["prompt_tokens"] == CONTEXT
    cfg = llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    slot = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # K and V, 2 rows, float32
    assert precut["kv_bytes_prefill"] == precut["kv_bytes_end"] == slot * (keep + NEW - 1)  # preallocated
    assert result["configs"]["stock_static"]["kv_bytes_prefill"] == slot * (CONTEXT + NEW - 1)
    assert 0.5 < result["schedule"]["kv_bytes_end"] / precut["kv_bytes_end"] < 2

    cache = StaticCache(config=cfg, max_cache_len=keep + NEW - 1)
    bench.greedy_run(llama, cut_ids, cut_mask, NEW, cache)
    assert cache.get_seq_length() == keep + NEW - 1  # the prefill wrote `keep` tokens, then one per fed step


def test_compare_reports_every_configuration_and_each_ratio(result):
    assert set(result["configs"]) == set(bench.CONFIGS) == set(result["labels"])
    for name, stats in result["configs"].items():
        assert stats["decode_steps"] == NEW - 1 and stats["decode_tokens_per_s"] > 0
        assert stats["plain_step_ms_max"] >= stats["plain_step_ms_mean"] > 0
        if name == "schedule":  # decode steps 4 and 8 of 11
            assert stats["trim_steps"] == 2 and stats["trim_step_ms_max"] >= stats["trim_step_ms_mean"] > 0
        else:
            assert stats["trim_steps"] == 0 and stats["trim_step_ms_mean"] is None
        assert len(result["runs"][name]) == 1
    # the older keys, read by calibrate.views and the notebooks, still mean stock DynamicCache
    assert result["stock"] == result["configs"]["stock_dynamic"] and result["schedule"] == result["configs"]["schedule"]
    assert result["ratios"] == result["ratios_vs"]["stock_dynamic"]
    assert result["largest_batch"]["stock"] == result["largest_batch"]["stock_dynamic"]
    assert result["ratios"]["kv_bytes_prefill"] < 1
    speed = result["decode_speed"]
    assert set(speed) == {"vs stock StaticCache", "vs stock DynamicCache", "of the pre-cut limit"}
    tok = {n: s["decode_tokens_per_s"] for n, s in result["configs"].items()}
    assert speed["of the pre-cut limit"] == pytest.approx(tok["schedule"] / tok["precut"])
    assert speed["vs stock StaticCache"] == pytest.approx(tok["schedule"] / tok["stock_static"])
    assert speed["vs stock DynamicCache"] == pytest.approx(result["ratios"]["decode_tokens_per_s"])
    assert json.loads(json.dumps(result)) == result  # JSON as written by --out (None becomes null and back)


def test_format_table_shows_every_baseline_and_labels_the_ratios(result):
    table = bench.format_table(result)
    for text in ("stock DynamicCache", "stock StaticCache", "pre-cut reference", "schedule", "trim step ms, max",
                 "vs stock StaticCache", "vs stock DynamicCache", "of the pre-cut limit", "largest batch"):  # fmt: skip
        assert text in table, text
    trims = next(line for line in table.splitlines() if line.startswith("| trim step ms, mean"))
    assert trims.count("| - ") == 3 and "speed-up" not in table.lower()
    assert f"last {result['precut_tokens']} of {CONTEXT} prompt tokens" in table


def test_bench_views_still_read_the_result(result):
    views = pytest.importorskip("calibrate.views")
    pytest.importorskip("matplotlib")
    views.bench_bars(result)


def test_compare_needs_a_decode_step(llama):
    ids, mask = prompt_batch()
    with pytest.raises(ValueError, match="new_tokens must be at least 2"):
        bench.compare(llama, ids, mask, tiny_schedule(), new_tokens=1, repeats=1)


def test_bench_command_end_to_end_on_a_tiny_model(tiny_model_dir, shared_data, tmp_path, capsys):
    from calibrate.cli import main

    out = tmp_path / "bench.json"
    text = shared_data / "gutenberg" / "pg1342_pride_and_prejudice.txt"
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(text), "--batch", "2", "--context", "128",
            "--new-tokens", "5", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert set(got["configs"]) == set(bench.CONFIGS) and got["precut_tokens"] < 128
    assert "stock StaticCache" in printed and f"pre-cut reference on the last {got['precut_tokens']}" in printed
    assert main([*argv[:-2], "--new-tokens", "1"]) == 2
    assert "--new-tokens 1: must be at least 2" in capsys.readouterr().err
    assert main([*argv[:-2], "--prefill-rows", "0"]) == 2
    assert "--prefill-rows 0: must be at least 1" in capsys.readouterr().err.splitlines()[-1]


def test_bench_against_a_second_schedule_in_the_same_run(tiny_model_dir, shared_data, tmp_path, capsys):
    """`--against` adds a second schedule as a fifth configuration and a baseline of the first; one made for
    another model is refused before any run, naming the flag."""
    from calibrate.cli import main

    out = tmp_path / "bench.json"
    text = shared_data / "gutenberg" / "pg1342_pride_and_prejudice.txt"
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(text), "--batch", "2", "--context", "128",
            "--new-tokens", "5", "--repeats", "1", "--schedule", "pyramidkv:0.3",
            "--against", "uniform:0.3"]  # fmt: skip
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert list(got["configs"]) == [*bench.CONFIGS, "other"] and got["against_name"] == "uniform-b0.3"
    assert got["against_kv_fraction"] == pytest.approx(got["kv_fraction"], abs=0.01)
    tok = {n: s["decode_tokens_per_s"] for n, s in got["configs"].items()}
    assert got["decode_speed"]["vs the --against schedule"] == pytest.approx(tok["schedule"] / tok["other"])
    assert "| --against schedule |" in printed and "| vs the --against schedule |" in printed
    wrong = tmp_path / "other_model.json"
    Schedule(ratios=[0.5] * 7, window=8, sinks=2).save(wrong)
    assert main([*argv[:-1], str(wrong)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the model's loading bar
    assert err.startswith(f"calibrate: error: --against {wrong}:") and "has 7 layer ratios but the model has 4" in err


def test_throughput_runs_stock_and_the_schedule_each_at_its_own_largest_batch(llama, result, monkeypatch):
    """Each configuration runs at the batch it is given (its KV grows with the rows it holds), the ratios are of
    the figures reported, and generation tokens/s counts the prefill too."""
    asked, walls = [], []
    run_config = bench.run_config

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = run_config(*args, **kwargs)
        walls.append(time.perf_counter() - started)
        return out

    monkeypatch.setattr(bench, "run_config", timed)

    def prompts(rows):
        asked.append(rows)
        return prompt_batch(rows)

    rows = {"stock_static": 2, "schedule": 5}
    t = bench.throughput_at_largest(llama, prompts, tiny_schedule(), rows, new_tokens=NEW, repeats=1)
    assert asked == [2, 5] and len(walls) == 4  # a warm-up each, then the timed runs
    for name, wall in zip(bench.THROUGHPUT_CONFIGS, walls[2:], strict=True):
        # the time the figure implies is the timed run's prefill plus its steps (from the step means), within the
        # run's wall time
        r = bench.RunStats(**t["configs"][name])
        plain = r.decode_steps - r.trim_steps
        steps_s = (r.plain_step_ms_mean * plain + (r.trim_step_ms_mean or 0.0) * r.trim_steps) / 1e3
        implied = rows[name] * NEW / t["generation_tokens_per_s"][name]
        assert implied == pytest.approx(r.prefill_s + steps_s, rel=1e-6) and implied <= wall
    assert t["rows"] == rows
    for name in bench.THROUGHPUT_CONFIGS:
        per_row = result["configs"][name]["kv_bytes_end"] / result["batch"]
        assert t["configs"][name]["kv_bytes_end"] == pytest.approx(per_row * rows[name], rel=0.05)
        assert t["generation_tokens_per_s"][name] < t["decode_tokens_per_s"][name]
    dec = t["decode_tokens_per_s"]
    assert t["decode_ratio"] == pytest.approx(dec["schedule"] / dec["stock_static"])
    table = bench.format_throughput(t)
    assert "| batch | 2 | 5 | 2.50x |" in table and "generation tokens/s (prefill included)" in table
    with pytest.raises(ValueError, match="stock StaticCache fits no row"):
        bench.throughput_at_largest(llama, prompts, tiny_schedule(), {"stock_static": 0, "schedule": 3})
    with pytest.raises(ValueError, match="the prompts hold 4 rows, not the 5 of schedule's largest batch"):
        bench.throughput_at_largest(llama, lambda n: prompt_batch(min(n, 4)), tiny_schedule(), rows)


def test_bench_throughput_adds_the_largest_batch_runs(tiny_model_dir, shared_data, tmp_path, capsys):
    from calibrate.cli import main

    out = tmp_path / "bench.json"
    text = shared_data / "gutenberg" / "pg1342_pride_and_prejudice.txt"
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(text), "--batch", "2", "--context", "128",
            "--new-tokens", "5", "--repeats", "1", "--throughput", "--prefill-rows", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    t = got["throughput"]
    assert got["prefill_rows"] == t["prefill_rows"] == 1  # the flag reaches both parts
    assert t["rows"] == {n: got["largest_batch"][n] for n in bench.THROUGHPUT_CONFIGS}
    assert t["rows"]["schedule"] > t["rows"]["stock_static"] == 2
    assert "| at the largest batch |" in printed


def test_prefill_in_row_chunks_decodes_the_same_tokens_into_the_same_cache(llama):
    ids, mask = prompt_batch(5)
    sched = tiny_schedule()
    runs = []
    for rows in (None, 2):
        tokens: list[torch.Tensor] = []
        with runtime.apply(llama, sched):
            stats = bench.greedy_run(llama, ids, mask, NEW, schedule=sched, tokens_out=tokens, prefill_rows=rows)
        runs.append((torch.cat(tokens, 1), stats))
    (whole, a), (chunked, b) = runs
    assert torch.equal(whole, chunked)
    assert (a.kv_bytes_prefill, a.kv_bytes_end) == (b.kv_bytes_prefill, b.kv_bytes_end)


def test_bench_throughput_reports_a_failure_inside_a_run_as_it_is(tiny_model_dir, shared_data, monkeypatch):
    """Only `ThroughputInputError` (what the user can change) becomes a "--throughput: ..." one-line error; a
    ValueError from inside a run (torch, the model) is not dressed up as the user's mistake."""
    from calibrate.cli import main

    def broken(*args, **kwargs):
        raise ValueError("from inside a run")

    monkeypatch.setattr(bench, "throughput_at_largest", broken)
    text = shared_data / "gutenberg" / "pg1342_pride_and_prejudice.txt"
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(text), "--batch", "2", "--context", "128",
            "--new-tokens", "3", "--repeats", "1", "--throughput"]  # fmt: skip
    with pytest.raises(ValueError, match="from inside a run"):
        main(argv)


def test_bench_throughput_with_too_little_text_names_the_flags_and_writes_nothing(
    tiny_model_dir, shared_data, tmp_path, capsys
):
    from calibrate.cli import main

    book = (shared_data / "gutenberg" / "pg1342_pride_and_prejudice.txt").read_text(encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text(book[20000:21300], encoding="utf-8")  # two windows of 128 tokens: batch 2, no more
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tiny_model_dir), "--data", str(short), "--batch", "2", "--context", "128",
            "--new-tokens", "5", "--repeats", "1", "--throughput", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("calibrate: error: --throughput: the prompts hold ") and "of schedule's largest batch" in err
    assert "--data" in err and "--context" in err and not out.exists()
