"""The experiment scripts behind README numbers run end to end and write their JSON (tiny model, tiny windows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import allocation_ceiling, paired_kl

WINDOWS = ["--context", "128", "--continuation", "16"]


def _uniform(model_dir: Path, budget: float, path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from runtime.families import model_info
    from runtime.reference import at_budget

    info = model_info(AutoModelForCausalLM.from_pretrained(model_dir))
    return at_budget("uniform", info.num_layers, budget, prompt_tokens=128, model=info).save(path)


def test_allocation_ceiling_compares_at_equal_memory(tiny_model_dir, shared_data, tmp_path, capsys):
    near = _uniform(tiny_model_dir, 0.3, tmp_path / "tiny_b0.3.json")  # within 0.001 of the requested 0.3
    other = _uniform(tiny_model_dir, 0.45, tmp_path / "tiny_b0.45.json")  # a budget that was not requested
    out = tmp_path / "nested" / "ceiling.json"  # a plain string path, a folder to create: as from the shell
    text = shared_data / "tinyshakespeare" / "input.txt"
    argv = [str(text), "--model", str(tiny_model_dir), "--schedules", str(near), str(other), "--budgets", "0.3"]
    allocation_ceiling.main([*argv, "--windows", "2", *WINDOWS, "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["uniform", "in-sample water-fill", str(near), "uniform", str(other)]
    assert len(result["curves"]) == 4 and all(len(c) == len(result["grid"]) for c in result["curves"])
    # each schedule is divided by a uniform of its own memory; equal to it, it scores the same KL
    for uni, given in ((rows[0], rows[2]), (rows[3], rows[4])):
        assert uni["budget"] == given["budget"]
        assert uni["kv_fraction"] == pytest.approx(given["kv_fraction"], abs=1e-3)
        assert given["kl"] == pytest.approx(uni["kl"]) and uni["kl"] > 0
    assert rows[3]["budget"] == rows[4]["kv_fraction"]  # not requested: a uniform built at its own KV fraction
    assert f"| {rows[4]['kv_fraction']:.3f} | {other} |" in capsys.readouterr().out


def test_paired_kl_pairs_windows_at_equal_memory(tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYRAMIDINFER_DATA", str(shared_data))
    schedule = _uniform(tiny_model_dir, 0.3, tmp_path / "tiny_b0.3.json")
    out = tmp_path / "paired.json"
    argv = [str(schedule), "--model", str(tiny_model_dir), "--data", "wikitext2", "--windows", "3", *WINDOWS]
    paired_kl.main([*argv, "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["calibrated", "uniform", "pyramidkv", "pyramidinfer", "full cache"]
    full = rows.pop("full cache")  # the reference row: perplexity of the uncompressed cache
    assert full["kl"] == 0 and 1 < full["ppl"] < rows["uniform"]["ppl"] * 1.5
    assert all(len(r["per_window_kl"]) == 3 for r in rows.values())
    # the "calibrated" schedule here is uniform itself: same KL on every window, so it wins none
    assert rows["uniform"]["per_window_kl"] == pytest.approx(rows["calibrated"]["per_window_kl"])
    assert rows["uniform"]["calibrated_wins"] == 0
    assert "| wikitext2 |" in capsys.readouterr().out


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for main in (lambda a: paired_kl.main(["s.json", *a]), lambda a: allocation_ceiling.main(["text.txt", *a])):
        with pytest.raises(SystemExit, match="^error: --out .*is not a folder; choose another --out"):
            main(["--model", "no-such-model", "--out", str(blocker / "x.json")])  # the model is never loaded


def test_evaluator_scores_per_head_shares():
    """What calibration scores: a fork of the prefilled cache under `head_ratios`, each head holding its own count."""
    from tiny_models import tiny_model

    from calibrate import scoring as evaluator
    from calibrate import tasks
    from runtime.cache import RaggedLayer
    from runtime.families import model_info
    from runtime.reference import at_budget
    from runtime.schedule import kept_tokens

    model = tiny_model("llama")
    info = model_info(model)
    windows = torch.randint(3, 128, (3, 144), generator=torch.Generator().manual_seed(0))
    ev = evaluator.Evaluator(model, tasks.text_examples(windows, 128), batch_size=2)
    base = at_budget("all_ones", info.num_layers, prompt_tokens=128, model=info)
    shares = [[1.0, 1.0], [0.1, 1.0], [1.0, 1.0], [1.0, 1.0]]
    mixed = base.with_ratios([sum(h) / 2 for h in shares], head_ratios=shares)
    cache = ev.compressed_cache(0, mixed)
    assert isinstance(cache.layers[1], RaggedLayer) and not isinstance(cache.layers[0], RaggedLayer)
    assert [u.stored() for u in cache.layers[1].units()] == [kept_tokens(0.1, 128, base.sinks, base.window), 128]
    both = ev.score(base.with_ratios([1.0, 0.1, 1.0, 1.0]))
    assert 0 < ev.score(mixed).kl < both.kl  # one head squeezed hurts less than both
    expected = (kept_tokens(0.1, 128, base.sinks, base.window) + 7 * 128) / (8 * 128)
    assert mixed.kv_fraction(128) == pytest.approx(expected)


def test_allocation_ceiling_per_head(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "ceiling.json"
    text = shared_data / "tinyshakespeare" / "input.txt"
    argv = [str(text), "--model", str(tiny_model_dir), "--budgets", "0.3", "--windows", "2", *WINDOWS]
    allocation_ceiling.main([*argv, "--per-head", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["uniform", "in-sample water-fill", "in-sample per-head water-fill"]
    heads = rows[2]["ratios"]
    assert len(heads) == 4 and all(len(h) == 2 for h in heads)  # 4 layers x 2 KV heads
    assert sum(map(sum, heads)) / 8 == pytest.approx(allocation_ceiling.mean_ratio_at(0.3, 128, 4 + 32), abs=1e-9)
    assert rows[2]["kv_fraction"] == pytest.approx(rows[0]["kv_fraction"], abs=2 / 128)  # rounding: a token a head
    assert len(result["head_curves"]) == 4 and all(
        len(c) == len(result["grid"]) for h in result["head_curves"] for c in h
    )


def test_allocation_ceiling_curves_from_other_text(tiny_model_dir, shared_data, tmp_path):
    """--curves-from: the curves come from other text (as in calibration), the scores from the given text."""
    scored = shared_data / "tinyshakespeare" / "input.txt"
    other = shared_data / "wikitext2_raw_test" / "wiki.test.raw"
    argv = [str(scored), "--model", str(tiny_model_dir), "--budgets", "0.3", "--windows", "2", *WINDOWS]
    allocation_ceiling.main([*argv, "--out", str(tmp_path / "in.json")])
    more = ["--curves-from", str(other), "--curve-windows", "3"]
    allocation_ceiling.main([*argv, *more, "--out", str(tmp_path / "out.json")])
    inside, outside = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("in", "out"))
    assert [r["method"] for r in outside["rows"]] == ["uniform", "water-fill"]
    assert outside["curves_from"] == [str(other)] and inside["curves_from"] == [str(scored)]
    assert outside["curves"] != inside["curves"]
    assert (outside["windows"], outside["curve_windows"], inside["curve_windows"]) == (2, 3, 2)
    assert outside["rows"][0]["kl"] == pytest.approx(inside["rows"][0]["kl"])  # scored on the same windows


def test_curve_windows_needs_curves_from(capsys):
    with pytest.raises(SystemExit):
        allocation_ceiling.main(["text.txt", "--curve-windows", "3", "--model", "no-such-model"])
    assert "--curve-windows applies to --curves-from" in capsys.readouterr().err


def test_cuda_check_runs_its_parts_and_records_them(tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys):
    """The GPU check, tried on CPU (--device cpu): the device comparison is then CPU against CPU, so it must agree
    exactly; the all-ones schedule must equal stock; the bench part runs and records a smaller KV cache."""
    from experiments import cuda_check

    monkeypatch.setattr(cuda_check, "BENCHES", (("schedule", "float32", 2, 128),))
    out = tmp_path / "check.json"
    text = shared_data / "gutenberg" / "pg1342_pride_and_prejudice.txt"
    argv = ["--model", str(tiny_model_dir), "--random-init", "--schedule", "pyramidkv:0.3", "--data", str(text)]
    cuda_check.main(
        [*argv, "--device", "cpu", "--prompt-tokens", "96", "--new-tokens", "6", "--repeats", "1", "--out", str(out)]
    )
    got = json.loads(out.read_text())
    assert got["ones_equal_stock_float32"]["equal"] and got["ones_equal_stock_bfloat16"]["equal"]
    agree = got["cpu_agreement_float32"]
    assert agree["kept_overlap_min"] == 1.0 and agree["first_logits_max_abs_diff"] == 0.0
    assert agree["tokens_equal_before_first_difference"] == [3, 3, 3, 3]
    (bench,) = got["bench"]
    assert bench["ratios"]["kv_bytes_prefill"] < 0.6 and bench["prefill_mode"] == "evict"
    assert "all-ones vs stock, bfloat16, cpu: 0 of 24 tokens differ" in capsys.readouterr().out


def test_gpu_calibration_time_dry_runs_on_cpu(tmp_path):
    """The prepared GPU timing command, on a tiny config on CPU: every part is written and the total adds up."""
    from experiments import gpu_calibration_time

    out = tmp_path / "t.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--context-length", "160", "--trials", "1",
            "--sample-layers", "2", "--out", str(out)]  # fmt: skip
    assert gpu_calibration_time.main(argv) == 0
    r = json.loads(out.read_text())
    parts = r["parts"]
    assert set(parts) == {"build", "prefill", "attention_recall", "layer_curves", "head_curves",
                          "fisher_head_curves", "search"}  # fmt: skip
    assert parts["layer_curves"]["sampled_layers"] == [0, 3]
    assert parts["head_curves"]["predicted_seconds"] == pytest.approx(parts["head_curves"]["seconds_per_curve"] * 8,
                                                                      abs=0.1)  # fmt: skip
    total = (parts["prefill"]["seconds"] + parts["attention_recall"]["seconds"]
             + parts["layer_curves"]["predicted_seconds"] + parts["head_curves"]["predicted_seconds"]
             + parts["search"]["seconds_per_trial"] * 40)  # fmt: skip
    assert r["predicted_calibrate_run_seconds"] == pytest.approx(total, abs=1.0)
    fisher = parts["fisher_head_curves"]
    assert fisher["predicted_seconds"] == pytest.approx(fisher["gradient_seconds"] + fisher["seconds_per_layer"] * 4,
                                                        abs=0.1)  # fmt: skip
    swapped = total - parts["head_curves"]["predicted_seconds"] + fisher["predicted_seconds"]
    assert r["predicted_calibrate_run_seconds_fisher"] == pytest.approx(swapped, abs=1.0)


def test_gpu_scale_dry_runs_on_cpu(tmp_path, capsys):
    """The prepared 8B GPU check on a tiny config on CPU: every part is written, all-ones equals stock, a padded
    row equals that row alone under per-head shares, the Triton kernel (interpreted) decodes the same tokens, and
    the kept KV is the schedule's fraction."""
    from experiments import gpu_scale

    out = tmp_path / "g.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--cases", "2x192", "--out", str(out)]
    assert gpu_scale.main(argv) == 0
    r = json.loads(out.read_text())
    parts = r["parts"]
    assert set(parts) == {"layer", "correctness", "end_to_end", "largest_batch"}
    ok = parts["correctness"]
    assert ok["all_ones_tokens_equal"] == ok["all_ones_tokens"] == 64
    assert ok["per_head_row_alone_token_agreement"] == [1.0] * 4
    assert ok["per_head_kept_fraction"] == pytest.approx(ok["per_head_schedule_kv_fraction"], abs=0.01)
    configs = parts["end_to_end"]["2x192"]["configs"]
    assert ok["kernel_tokens_equal"] == ok["kernel_tokens"] == 64
    assert list(configs) == ["stock_dynamic", "stock_static", "precut", "uniform", "per_head", "per_head_kernel"]
    assert configs["per_head_kernel"]["kv_bytes_prefill"] == configs["per_head"]["kv_bytes_prefill"]
    assert configs["per_head"]["trim_steps"] == 1 and configs["stock_static"]["trim_steps"] == 0  # 9 steps, every 8
    assert configs["per_head"]["kv_bytes_prefill"] < 0.5 * configs["stock_static"]["kv_bytes_prefill"]
    assert configs["precut"]["prompt_tokens"] == round(0.3 * 192)
    largest = parts["largest_batch"]
    assert set(largest["rows"]) == set(configs)
    assert largest["chunked_prefill"] == ["per_head", "per_head_kernel", "uniform"]
    assert "| decode tok/s |" in capsys.readouterr().out
    # the schedules prefill in chunks of the case's batch: their measured peak once, then their decode cache per row
    free, ph = largest["memory_bytes"] - largest["weights_bytes"], configs["per_head"]
    peak = max(ph["peak_memory_bytes"], ph["kv_bytes_peak"])
    assert ph["cache_bytes_end"] > ph["kv_bytes_end"]  # slot positions, validity and recent queries besides
    row = ph["kv_bytes_peak"] / 2 * ph["cache_bytes_end"] / ph["kv_bytes_end"]
    assert largest["rows"]["per_head"] == 2 + int((free - peak) // row)


def test_gpu_scale_throughput_part_runs_each_at_its_largest_batch(tmp_path):
    from experiments import gpu_scale

    out = tmp_path / "g.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--cases", "1x384", "--parts", "e",
            "--memory-gib", "0.05", "--new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert gpu_scale.main(argv) == 0
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"end_to_end", "largest_batch", "throughput"}
    rows, t = parts["largest_batch"]["rows"], parts["throughput"]
    assert t["rows"] == {"stock_static": rows["stock_static"], "schedule": rows["per_head"]}
    assert t["prefill_rows"] == 1 and t["rows"]["schedule"] > t["rows"]["stock_static"] >= 1
    assert set(t["peak_fits"]) == {"stock_static", "schedule"}


def test_stagger_steps_compares_aligned_and_staggered_trims(shared_data, tmp_path, capsys):
    """Both settings run the same steps; aligned, only step 32 trims; staggered, most steps trim some layer."""
    from experiments import stagger_steps

    out = tmp_path / "s.json"
    argv = ["--batch", "1", "--context", "160", "--new-tokens", "34", "--repeats", "1", "--out", str(out)]
    assert stagger_steps.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["aligned"]["decode_steps"] == r["staggered"]["decode_steps"] == 33
    assert r["aligned"]["trim_steps"] == 1 and r["staggered"]["trim_steps"] > 20
    assert "| slowest step ms |" in capsys.readouterr().out


def test_dtype_noise_measures_each_unit_in_both_dtypes(shared_data, tmp_path, capsys):
    from experiments import dtype_noise

    out = tmp_path / "d.json"
    assert dtype_noise.main(["--context-length", "256", "--units", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [u["layer"] for u in r["float32"]] == [u["layer"] for u in r["bfloat16"]] == [5]
    assert r["float32"][0]["text_kl"] > 0 and r["bfloat16"][0]["text_kl"] > 0
    assert "| 5 | all | 0.02 |" in capsys.readouterr().out


def test_head_curve_shortcuts_scores_each_shortcut_against_the_measured_curves(repo_root, tmp_path, capsys):
    """On the shipped profile: no head curves at all costs far more than any partial shortcut, and a shortcut that
    keeps every grid point would cost nothing (checked through `scaled` itself)."""
    from calibrate.profiling import Profile
    from experiments import head_curve_shortcuts as hcs

    stem = repo_root / "schedules" / "smollm2-135m-instruct"
    out = tmp_path / "h.json"
    assert hcs.main(["--profile", str(stem), "--out", str(out)]) == 0
    rows = {r["shortcut"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["per layer"]["b0.3"] > 2.0
    assert all(0.99 <= r["b0.3"] < rows["per layer"]["b0.3"] for n, r in rows.items() if n != "per layer")
    prof = Profile.load(stem)
    torch.testing.assert_close(hcs.scaled(prof, list(range(len(prof.grid)))), prof.head_parts, rtol=1e-5, atol=1e-9)
    assert "| per layer | 100% |" in capsys.readouterr().out


def test_recall_by_head_averages_to_the_layer_recall_and_splits_the_layer_curve():
    """`attention_recall(by_head=True)` is the per-KV-head form of the profile's recall (its head mean is the
    same); `recall_head_split` shares a layer's curve out over its heads and the shares add back up to it."""
    from tiny_models import tiny_model

    from calibrate import tasks
    from calibrate.profiling import Profile, attention_recall
    from calibrate.scoring import Evaluator
    from experiments.recall_head_split import split_by_loss
    from runtime.schedule import Selection

    model = tiny_model("llama", kv_heads=2)
    windows = torch.randint(3, 128, (3, 112), generator=torch.Generator().manual_seed(0))
    ev = Evaluator(model, tasks.text_examples(windows, 96), query_window=16, sinks=2, batch_size=2)
    grid = [0.1, 0.25, 0.5]
    layer_recall, layer_overlap, _ = attention_recall(model, ev, 2, 8, Selection(), grid, [8])
    recall, overlap, _ = attention_recall(model, ev, 2, 8, Selection(), grid, [8], by_head=True)
    assert recall.shape == (ev.layers, 2, 3)
    torch.testing.assert_close(recall.mean(1), layer_recall)
    torch.testing.assert_close(overlap.mean(1), layer_overlap)
    assert float((recall[:, 0] - recall[:, 1]).abs().max()) > 0  # the heads do differ
    parts = torch.rand(2, ev.layers, 3, generator=torch.Generator().manual_seed(1))
    prof = Profile(grid=grid, windows=[8], recall=layer_recall, overlap=layer_overlap,
                   window_recall=torch.zeros(ev.layers, 1), sensitivity=parts.mean(0), compressible=[True] * ev.layers,
                   parts=parts)  # fmt: skip
    split = split_by_loss(prof, 1 - recall)
    torch.testing.assert_close(split.sum(2), parts)
    equal = split_by_loss(prof, torch.ones_like(recall))
    torch.testing.assert_close(equal, parts[:, :, None].expand(-1, -1, 2, -1) / 2)


def test_head_points_rebuilds_the_shipped_schedules_and_keeps_their_memory(tmp_path, capsys):
    """`head_points` rebuilds each shipped schedule from its own parameters (it stops unless the full profile
    gives the shipped shares back), then from head curves at fewer points: same KV, other shares."""
    from experiments import head_points
    from runtime.schedule import load_schedule

    repo_root = Path(__file__).resolve().parents[1]
    shipped = repo_root / "schedules" / "smollm2-135m-instruct_b0.3.json"
    stem = str(repo_root / "schedules" / "smollm2-135m-instruct")
    for points, folder in (("all", tmp_path / "all"), ("0.02,0.1,0.5", tmp_path / "three")):
        assert head_points.main([str(shipped), "--profile", stem, "--points", points, "--out-dir", str(folder)]) == 0
    same, fewer, original = (load_schedule(p) for p in (tmp_path / "all" / shipped.name,
                                                       tmp_path / "three" / shipped.name, shipped))  # fmt: skip
    assert same.head_ratios == original.head_ratios
    assert fewer.head_ratios != original.head_ratios
    assert fewer.kv_fraction() == pytest.approx(original.kv_fraction(), abs=1e-3)
    assert fewer.provenance["head_points"] == [0.02, 0.1, 0.5]
    copy = tmp_path / "copy" / shipped.name
    copy.parent.mkdir()
    copy.write_text(shipped.read_text())
    with pytest.raises(SystemExit, match="both be written to"):
        head_points.main([str(shipped), str(copy), "--profile", stem, "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="would overwrite the input"):
        head_points.main([str(copy), "--profile", stem, "--out-dir", str(copy.parent)])
    with pytest.raises(SystemExit, match="--points 0.3"):
        head_points.main([str(shipped), "--profile", stem, "--points", "0.3", "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_batched_curves_times_every_batch_size(tiny_model_dir, tmp_path, capsys):
    from experiments import batched_curves

    out = tmp_path / "b.json"
    argv = ["--model", str(tiny_model_dir), "--context", "32", "--continuation", "4", "--factors", "1,2"]
    assert batched_curves.main([*argv, "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [3, 6] and rows[0]["vs_3_rows"] == 1.0
    assert all(r["seconds_per_3_rows"] > 0 for r in rows)
    assert "| rows per forward |" in capsys.readouterr().out


def test_interleaved_steps_times_every_cache_on_the_same_steps(shared_data, tmp_path, capsys):
    """Every configuration decodes every step; the kept KV matches between the per-head schedule's two storages."""
    from experiments import interleaved_steps

    out = tmp_path / "i.json"
    argv = ["--batch", "2", "--context", "160", "--steps", "6", "--head-by-head", "--out", str(out)]
    assert interleaved_steps.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["plain_step_ms_median"]) == {"per head", "per layer", "per head, head by head"}
    assert r["kv_mib"]["per head"] == r["kv_mib"]["per head, head by head"]
    assert set(r["speed_vs_per_layer"]) == {"per head", "per head, head by head"} and r["flat_vs_head_by_head"] > 0
    assert "flat buffers: speed" in capsys.readouterr().out
    from runtime.ragged_layer import RaggedLayer

    assert RaggedLayer.flat  # the switch is restored


def test_interleaved_steps_ones_against_stock_static_with_prefills(shared_data, tmp_path, capsys):
    """--ones: the all-ones schedule and stock StaticCache decode the same tokens; prefills are timed paired."""
    from experiments import interleaved_steps

    out = tmp_path / "i.json"
    argv = ["--ones", "--prefills", "2", "--batch", "2", "--context", "160", "--steps", "6", "--out", str(out)]
    assert interleaved_steps.main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["plain_step_ms_median"]) == set(r["prefill_s_median"]) == {"all-ones", "stock StaticCache"}
    assert r["same_tokens"] and set(r["speed_vs_stock_static"]) == set(r["prefill_time_vs_stock_static"]) == {
        "all-ones"
    }
    for key in ("prefill_minor_faults_median", "decode_minor_faults_per_step"):
        assert set(r[key]) == {"all-ones", "stock StaticCache"} and all(f >= 0 for f in r[key].values())
    assert all(k.startswith("MALLOC_") for k in r["malloc_env"])
    printed = capsys.readouterr().out
    assert "all-ones: prefill time" in printed and "prefill round 2/2" in printed
    assert "| prefill minor page faults, median |" in printed
    with pytest.raises(SystemExit):
        interleaved_steps.main(["--ones", "--head-by-head"])


def test_widest_splits_are_the_layers_whose_heads_differ_most():
    from experiments.head_points import widest_splits

    # [K=1, L=3, H=2, G=1]: layer 0 splits 50/50, layer 1 90/10, layer 2 70/30
    heads = torch.tensor([[[[1.0], [1.0]], [[9.0], [1.0]], [[0.7], [0.3]]]])
    layers = heads.sum(2)
    assert widest_splits(heads, layers, 2) == [1, 2]
    assert widest_splits(heads, layers, 0) == []


def test_minor_faults_count_pages_touched_for_the_first_time():
    import mmap

    from experiments.interleaved_steps import minor_faults

    pages = 256
    fresh = mmap.mmap(-1, pages * mmap.PAGESIZE)  # an anonymous mapping: pages the process never touched
    before = minor_faults()
    for p in range(pages):
        fresh[p * mmap.PAGESIZE] = 1
    assert minor_faults() - before >= pages // 2  # transparent huge pages may map several at once
    fresh.close()


def test_cut_continuations_score_their_tokens_as_the_whole_continuation_does():
    """`tasks.cut_continuations`: attention is causal, so each kept token's KL is the one the whole continuation
    gave it (what makes the cut curves those of a profile with shorter windows)."""
    from tiny_models import tiny_model

    from calibrate import tasks
    from calibrate.scoring import Evaluator, one_part_compressed
    from calibrate.tasks import cut_continuations
    from runtime.schedule import Schedule

    model = tiny_model("llama", kv_heads=2)
    windows = torch.randint(3, 128, (3, 112), generator=torch.Generator().manual_seed(0))
    examples = tasks.text_examples(windows, 96)
    full = Evaluator(model, examples, query_window=16, sinks=2)
    short = Evaluator(model, cut_continuations(examples, 6), query_window=16, sinks=2)
    sched = one_part_compressed(Schedule(ratios=[1.0] * full.layers, window=8, sinks=2), 1, 1, 0.2, 2)
    for a, b in zip(full.rows(sched, from_layer=1), short.rows(sched, from_layer=1), strict=True):
        assert b.kl.numel() == 5 and a.kl.numel() == 15
        torch.testing.assert_close(b.kl, a.kl[:5], rtol=1e-4, atol=1e-9)
        assert float(b.kl.sum()) > 0


def test_profile_continuation_rebuilds_schedules_from_cut_text_curves(tiny_model_dir, shared_data, tmp_path, capsys):
    """On a profile `calibrate run` just measured: the full-length check passes, cut text curves are measured at the
    cut grid points, and each schedule is rebuilt at its own KV; a profile whose saved curves are not what its
    windows give is refused before anything is written, and so is an --out-dir over the input."""
    from calibrate.cli import main as calibrate
    from calibrate.profiling import Profile
    from experiments import profile_continuation
    from runtime.schedule import load_schedule

    out = tmp_path / "s.json"
    text = shared_data / "tinyshakespeare" / "input.txt"
    argv = ["run", "--model", str(tiny_model_dir), "--data", str(text), "--quick", "--head-curves", "measured",
            "--context-length", "128", "--budget", "0.4", "--trials", "4", "--out", str(out)]  # fmt: skip
    assert calibrate(argv) == 0
    stem, folder = str(tmp_path / "s"), tmp_path / "cut"
    argv = [str(out), "--profile", stem, "--continuation", "16", "--full-at", "0.5", "--out-dir", str(folder)]
    assert profile_continuation.main([*argv, "--out", str(tmp_path / "c.json")]) == 0
    rebuilt, original = load_schedule(folder / "s.json"), load_schedule(out)
    assert rebuilt.kv_fraction() == pytest.approx(original.kv_fraction(), abs=2e-2)
    assert rebuilt.provenance["profile_change"] == {"text_continuation": 16, "full_at": [0.5]}
    curves = json.loads((tmp_path / "c.json").read_text())["curves"]
    prof = Profile.load(stem)
    assert curves["grid"] == prof.grid[:4] and len(curves["heads"][0]) == 2
    assert torch.tensor(curves["heads"]).ne(prof.head_parts[0][..., :4]).any()  # measured again, on fewer tokens
    assert "come back to" in capsys.readouterr().out
    bad = [str(out), "--profile", stem, "--out-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match="--continuation 64: must be 2 to 63"):
        profile_continuation.main([*bad, "--continuation", "64"])
    with pytest.raises(SystemExit, match="nothing left to cut"):
        profile_continuation.main([*bad, "--continuation", "16", "--full-at", ",".join(map(str, prof.grid))])
    with pytest.raises(SystemExit, match="would overwrite"):
        profile_continuation.main([str(out), "--profile", stem, "--continuation", "16", "--out-dir", str(tmp_path)])
    prof.meta["settings"]["profile_continuation"] = 16  # a profile already cut: nothing to compare against
    prof.save(tmp_path / "cut_already")
    with pytest.raises(SystemExit, match="was measured with --profile-continuation 16"):
        profile_continuation.main([str(out), "--profile", str(tmp_path / "cut_already"), "--continuation", "8",
                                   "--out-dir", str(tmp_path / "x")])  # fmt: skip
    prof.meta["settings"]["profile_continuation"] = None
    prof.parts[0, -1] *= 1.5  # saved curves that the windows do not give back
    prof.save(tmp_path / "moved")
    with pytest.raises(SystemExit, match="differ from the saved ones"):
        profile_continuation.main([str(out), "--profile", str(tmp_path / "moved"), "--continuation", "16",
                                   "--out-dir", str(tmp_path / "x")])  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_profile_continuation_replaces_only_the_text_curves_at_the_cut_points():
    from calibrate.profiling import Profile
    from experiments.profile_continuation import with_text_curves

    g = torch.Generator().manual_seed(0)
    parts, heads = torch.rand(2, 3, 5, generator=g), torch.rand(2, 3, 2, 5, generator=g)
    zeros = torch.zeros(3, 5)
    prof = Profile(grid=[0.02, 0.05, 0.1, 0.25, 0.5], windows=[8], recall=zeros, overlap=zeros,
                   window_recall=torch.zeros(3, 1), sensitivity=parts.mean(0), compressible=[True] * 3,
                   parts=parts, part_names=["retrieval", "text"], head_parts=heads)  # fmt: skip
    new_layers, new_heads = torch.full((3, 3), 7.0), torch.full((3, 2, 3), 9.0)
    changed = with_text_curves(prof, [0, 1, 3], new_layers, new_heads)
    assert torch.equal(changed.parts[1][:, [0, 1, 3]], new_layers)
    assert torch.equal(changed.head_parts[1][:, :, [0, 1, 3]], new_heads)
    assert torch.equal(changed.parts[1][:, [2, 4]], parts[1][:, [2, 4]])  # the full-length points stay
    assert torch.equal(changed.head_parts[1][:, :, [2, 4]], heads[1][:, :, [2, 4]])
    assert torch.equal(changed.parts[0], parts[0]) and torch.equal(changed.head_parts[0], heads[0])  # tasks stay
    torch.testing.assert_close(changed.sensitivity, changed.parts.mean(0))
    assert torch.equal(prof.parts, parts) and not torch.equal(changed.parts, parts)  # the input is not modified


def test_unit_cost_times_every_part_and_the_task_batchings_agree(tiny_model_dir, tmp_path, capsys):
    from experiments import unit_cost

    out = tmp_path / "u.json"
    argv = ["--model", str(tiny_model_dir), "--context-length", "128", "--cut", "16", "--repeats", "1"]
    assert unit_cost.main([*argv, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["part"] for row in r["rows"]] == ["text", "text cut to 16", "tasks in 4s", "tasks in one"]
    assert all(row["seconds"] > 0 for row in r["rows"]) and r["task_kl_max_relative_difference"] < 1e-3
    assert "| text cut to 16 |" in capsys.readouterr().out


def test_run_times_times_each_option_set_in_fresh_folders(tiny_model_dir, shared_data, tmp_path, capsys):
    from experiments import run_times

    text = shared_data / "tinyshakespeare" / "input.txt"
    common = f"--model {tiny_model_dir} --data {text} --quick --context-length 128 --trials 3"
    out = tmp_path / "times.json"
    argv = ["--rounds", "2", "--config", f"fisher={common}"]
    assert run_times.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result) == ["fisher"] and result["fisher"]["wall_vs_fisher"] == 1.0
    runs = result["fisher"]["runs"]
    assert len(runs) == 2  # fresh folders: the second round measured its own profile too
    assert all(0 < r["profile_seconds"] < r["wall_seconds"] for r in runs)
    with pytest.raises(SystemExit):
        run_times.main(["--config", "no-name"])
    assert "--config 'no-name' is not NAME='OPTIONS'" in capsys.readouterr().err
    bad = ["--rounds", "1", "--config", f"bad={common} --fisher-samples 0"]
    with pytest.raises(SystemExit, match=r"exited with 2: .*--fisher-samples 0"):
        run_times.main(bad)
