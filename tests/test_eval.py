"""`calibrate eval` and calibrate.evaluation on tiny random models (no real model needed, a few seconds each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

import runtime
from calibrate import evaluation as ev
from calibrate.cli import main
from calibrate.scoring import Evaluator
from calibrate.tasks import text_examples
from runtime.reference import at_budget, uniform

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when another job shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- pure pieces


def test_middle_truncate():
    ids = list(range(10))
    assert ev.middle_truncate(ids, 4) == [0, 1, 8, 9]
    assert ev.middle_truncate(ids, 5) == [0, 1, 7, 8, 9]
    assert ev.middle_truncate(ids, 10) == ids
    assert ev.middle_truncate(ids, 50) == ids
    with pytest.raises(ValueError):
        ev.middle_truncate(ids, 1)


def test_pick_rows():
    rows = [{"_id": str(i), "length": n} for i, n in enumerate([50, 10, 40, 20, 30])]
    assert [r["length"] for r in ev.pick_rows(rows, 2, "shortest")] == [10, 20]
    assert [r["length"] for r in ev.pick_rows(rows, 3, "spread")] == [10, 30, 50]
    assert len(ev.pick_rows(rows, 9, "shortest")) == 5


def test_needle_correct():
    assert ev.needle_correct(" 48213.", ["48213"])
    assert not ev.needle_correct(" 4821.", ["48213"])
    assert not ev.needle_correct(" 11111 or 48213", ["48213"])  # the first number counts
    assert ev.needle_correct(" 222 and 111.", ["111", "222"])
    assert not ev.needle_correct(" 111 only", ["111", "222"])


def test_make_configs(tmp_path: Path):
    path = uniform(4, 0.5, budget=0.25, name="cal").save(tmp_path / "cal.json")
    configs = ev.make_configs(["full", "uniform", "random"], [0.3], ["evict", "drop"], [str(path)])
    keys = [c.key for c in configs]
    assert keys[0] == "full@1/evict" and keys.count("full@1/evict") == 1
    # the file's budget joins the references' budgets; the file runs in each mode, as it is
    assert {"uniform@0.25/evict", "uniform@0.3/evict", "random@0.3/drop", "cal@0.25/drop"} <= set(keys)
    with pytest.raises(ev.EvalError, match="outside"):
        ev.make_configs(["uniform"], [1.5], ["evict"])
    with pytest.raises(ev.EvalError, match="unknown method"):
        ev.make_configs(["snapkv"], [0.3], ["evict"])


def test_schedule_maker_builds_references_at_the_budget():
    model = tiny_model("llama")
    maker = ev.ScheduleMaker(model)
    for method in ("uniform", "pyramidkv", "pyramidinfer", "streamingllm", "random"):
        s = maker.schedule(ev.Config(method, 0.4, "drop"), 300)
        assert abs(s.kv_fraction(300) - 0.4) <= 1 / 300 + 1e-9, method
        assert s.prefill_mode == "drop"
    assert maker.schedule(ev.Config("streamingllm", 0.4), 300).selection.method == "recent"
    assert maker.schedule(ev.Config("random", 0.4), 300).selection.method == "random"
    assert maker.schedule(ev.Config("full", 1.0), 300) is None
    with pytest.raises(ev.EvalError, match="minimum"):
        maker.schedule(ev.Config("uniform", 0.2), 100)  # sinks + window = 36 > 20 tokens


# ---------------------------------------------------------------- prefill once, fork: same as the runtime's path


@pytest.mark.parametrize("mode", ["evict", "drop"])
def test_forked_generation_equals_generation_under_the_schedule(mode):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids, question = torch.randint(3, 128, (200,), generator=g), torch.randint(3, 128, (12,), generator=g)
    sched = at_budget("pyramidkv", 4, 0.3, prompt_tokens=200, window=16, prefill_mode=mode)
    prefix = ev.Prefix(model, ids)
    s, cache, logp, kv = prefix.compressed(sched)
    assert kv[0] == pytest.approx(sched.kv_fraction(200))
    ours = ev.generate_after(model, prefix, s, cache, logp, None, 30, [])[0]
    with torch.inference_mode(), runtime.apply(model, sched):
        ref = model.generate(ids[None], max_new_tokens=30, **GREEDY)[0, 200:].tolist()
    assert ours == ref
    # the question fed after compression
    s, cache, logp, _ = prefix.compressed(sched)
    ours = ev.generate_after(model, prefix, s, cache, logp, question, 20, [])[0]
    full = torch.cat([ids, question])[None]
    with torch.inference_mode(), runtime.apply(model, sched):
        c = model(ids[None]).cache
        ref = model.generate(full, attention_mask=torch.ones_like(full), cache=c, max_new_tokens=20, **GREEDY)
    assert ours == ref[0, full.shape[1] :].tolist()


def test_full_cache_path_equals_stock_generation_and_nll():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(1))
    answer = torch.tensor([5, 9, 17, 33])
    prefix = ev.Prefix(model, ids)
    s, cache, logp, kv = prefix.compressed(None)
    assert kv == [1.0]
    ours = ev.generate_after(model, prefix, s, cache.fork(s), logp, None, 16, [])[0]
    with torch.inference_mode():
        stock = model.generate(ids[None], max_new_tokens=16, **GREEDY)[0, 150:].tolist()
        lp = torch.log_softmax(model(torch.cat([ids, answer])[None]).logits[0].float(), -1)
    assert ours == stock
    expected = -sum(float(lp[149 + i, answer[i]]) for i in range(4)) / 4
    nll = ev.answer_nll(model, prefix, s, cache, logp, None, [answer])
    assert nll[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("mode", ["evict", "drop"])
@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_padded_batch_equals_each_prompt_alone(mode, after, per_head):
    model = tiny_model("llama", kv_heads=2)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (180, 140, 200)]
    answers = [torch.randint(3, 128, (k,), generator=g) for k in (5, 1, 3)]
    extra = torch.randint(3, 128, (3, 6), generator=g) if after else None
    sched = at_budget("uniform", 4, 0.35, prompt_tokens=170, window=16, prefill_mode=mode)
    if per_head:  # KV heads keep different shares: the cache holds ragged layers (one buffer per head)
        heads = [[0.5, 0.2], [0.2, 0.5], [0.35, 0.35], [0.6, 0.1]]
        sched = dataclasses.replace(sched, ratios=[sum(h) / 2 for h in heads], head_ratios=heads)
    eos = [7]  # a token the random model emits now and then: rows stop at different steps

    def outputs(prefix, e, a):
        s, cache, logp, kv = prefix.compressed(sched)
        nll = ev.answer_nll(model, prefix, s, cache.fork(s), logp, e, a)
        return ev.generate_after(model, prefix, s, cache, logp, e, [12, 9, 12], eos), nll, kv

    new, nll, kv = outputs(ev.Prefix(model, rows), extra, answers)
    for i, row in enumerate(rows):
        alone_new, alone_nll, alone_kv = outputs(
            ev.Prefix(model, [row]), None if extra is None else extra[i], [answers[i]]
        )
        assert new[i] == ev.cut_at_eos(alone_new[0], eos, [12, 9, 12][i]), f"row {i}"
        assert nll[i] == pytest.approx(alone_nll[0], rel=1e-4, abs=1e-5)
        assert kv[i] == pytest.approx(alone_kv[0])


def test_batches_by_length():
    # padding may at most double the tokens: the outlier goes alone
    assert ev.batches_by_length([100, 400, 110, 120, 390, 3000], lambda x: x, size=4) == [
        [100, 110, 120],
        [390, 400],
        [3000],
    ]
    assert [len(b) for b in ev.batches_by_length(list(range(100, 109)), lambda x: x, size=8)] == [4, 5]
    assert ev.batches_by_length([], lambda x: x, size=8) == []


def test_lm_task_matches_the_evaluator():
    model = tiny_model("llama")
    windows = torch.randint(3, 128, (3, 160), generator=torch.Generator().manual_seed(2))
    settings = ev.Settings(lm_context=128, lm_continuation=32, lm_windows=3, lm_batch=2)
    task = ev.LMTask(model, None, settings, windows=windows)
    sched = at_budget("uniform", 4, 0.4, prompt_tokens=128, window=16)
    records = task.run_all(sched)
    batches = []
    scores = task.evaluator.score(sched, on_batch=lambda done, kl: batches.append((done, kl)))
    assert [r["kl"] for r in records] == scores.per_example_kl  # one code path: the same numbers, not just close
    assert sum(r["nll"] for r in records) / 3 == pytest.approx(scores.nll, rel=1e-5)
    assert [done for done, _ in batches] == [1, 2] and batches[-1][1] == scores.kl  # windows 2 + 1
    assert batches[0][1] == pytest.approx(sum(r["kl"] for r in records[:2]) / 2, rel=1e-5)
    full = task.run_all(None)
    assert all(abs(r["kl"]) < 1e-6 and r["kv_fraction"] == 1.0 for r in full)
    drop = task.run_all(at_budget("uniform", 4, 0.4, prompt_tokens=128, window=16, prefill_mode="drop"))
    assert all(r["kl"] > 0 and r["kv_fraction"] == pytest.approx(0.4, abs=0.01) for r in drop)


def test_evaluator_rows_in_drop_mode_equal_a_prefill_under_the_schedule():
    """`Evaluator.rows` in drop mode scores what a plain prefill under the schedule gives, against the full cache."""
    model = tiny_model("llama")
    windows = torch.randint(3, 128, (2, 160), generator=torch.Generator().manual_seed(4))
    evaluator = Evaluator(model, text_examples(windows, 128), batch_size=2)
    sched = at_budget("pyramidkv", 4, 0.4, prompt_tokens=128, window=16, prefill_mode="drop")
    rows = evaluator.rows(sched, prefill_mode="drop", measure_kv=True)
    with torch.inference_mode():
        full = torch.log_softmax(model(windows).logits[:, 128:].float(), -1)
        with runtime.apply(model, sched):
            cache = model(windows[:, :128]).cache
            kept = ev.row_kv_fractions(cache, runtime.families.layer_plan(model), [128, 128])
            ours = torch.log_softmax(model(windows[:, 128:], cache=cache).logits.float(), -1)
    for i, row in enumerate(rows):
        lp, rp, targets = ours[i, :-1], full[i, :-1], windows[i, 129:]
        kl = (rp.exp() * (rp - lp)).sum(-1)
        nll = -lp.gather(-1, targets[:, None])[:, 0]
        assert row.index == i and row.correct is None and row.kv_fraction == kept[i]
        torch.testing.assert_close(row.kl, kl, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(row.nll, nll, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="prefill_mode"):
        evaluator.rows(sched, prefill_mode="prefill")


# ---------------------------------------------------------------- the command, end to end on a tiny model


TINY = [
    "--quick", "--budgets", "0.5", "--methods", "full,uniform,streamingllm",
    "--lm-context", "192", "--lm-continuation", "16", "--lm-windows", "2",
    "--datasets", "hotpotqa,lcc", "--samples", "1", "--max-prompt-tokens", "400", "--max-new-tokens", "3",
    "--needle-lengths", "256", "--needle-depths", "50", "--needle-variants", "single,multivalue",
    "--needle-questions", "both",
]  # fmt: skip


def test_eval_command_end_to_end_and_resume(tiny_model_dir: Path, shared_data: Path, tmp_path: Path, capsys,
                                            monkeypatch):  # fmt: skip
    out = tmp_path / "eval"
    cal = uniform(4, 0.6, budget=0.5, name="cal").save(tmp_path / "cal.json")
    args = ["eval", "--model", str(tiny_model_dir), "--out-dir", str(out), "--schedule", str(cal), *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| method | budget | mode | KV |" in text and "avg score" in text
    assert "| cal | 0.5 | evict |" in text and "| streamingllm | 0.5 | evict |" in text
    for name in ("results.json", "results.md", "quality_vs_kv.png", "needle_in-prompt_b0.5_evict.png",
                 "needle_after-compression_b0.5_evict.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    # full + (uniform, streamingllm, cal) at 0.5; lm 1 group, longbench 2 datasets, needle 1 cell x 2 questions
    assert len(records) == 4 * (1 + 2 + 2)
    assert all(r["complete"] for r in records)
    lm = next(r for r in records if r["task"] == "lm" and r["method"] == "uniform")
    assert len(lm["samples"]) == 2 and {"mean", "ci_low", "ci_high", "n"} <= set(lm["stats"]["kl"])
    lb = next(r for r in records if r["task"] == "longbench" and r["group"] == "lcc" and r["method"] == "full")
    assert lb["metric"] == "code_sim" and lb["samples"][0]["prompt_tokens"] <= 400
    needle = [r for r in records if r["task"] == "needle"]
    assert {len(r["samples"]) for r in needle} == {2} and {r["depth"] for r in needle} == {50}
    assert data["meta"]["command"].startswith("calibrate eval")

    # a second run computes nothing: no prefill at all
    calls = []
    original = ev.Prefix.full
    monkeypatch.setattr(ev.Prefix, "full", lambda self: calls.append(1) or original(self))
    monkeypatch.setattr(ev.LMTask, "run_all", lambda *a, **k: calls.append(1) or [])
    before = (out / "results.json").read_text()
    assert main(args) == 0
    assert "computed 0 results, reused 32" in capsys.readouterr().out
    assert calls == []
    assert json.loads((out / "results.json").read_text())["records"] == json.loads(before)["records"]

    # a lost sample is the only thing recomputed
    data["records"][-1]["samples"].pop()
    (out / "results.json").write_text(json.dumps(data))
    monkeypatch.undo()
    assert main(args) == 0
    assert "computed 1 results, reused 31" in capsys.readouterr().out

    # a schedule file changed under the same name: its results are recomputed, the references' are kept
    uniform(4, 0.5, budget=0.5, name="cal").save(cal)
    assert main(args) == 0
    assert "computed 8 results, reused 24" in capsys.readouterr().out
    # a changed selection also changes the references, which borrow it from the first schedule file
    changed = uniform(4, 0.5, budget=0.5, name="cal")
    dataclasses.replace(changed, selection=dataclasses.replace(changed.selection, pooling="none")).save(cal)
    assert main(args) == 0
    assert "computed 24 results, reused 8" in capsys.readouterr().out


def test_eval_refuses_other_settings_in_the_same_out_dir(tiny_model_dir: Path, shared_data: Path, tmp_path: Path,
                                                         capsys):  # fmt: skip
    out = tmp_path / "eval"
    base = ["eval", "--model", str(tiny_model_dir), "--out-dir", str(out), "--tasks", "lm", "--methods", "full",
            "--lm-context", "128", "--lm-continuation", "8", "--lm-windows", "1", "--no-plots"]  # fmt: skip
    assert main(base) == 0
    capsys.readouterr()
    assert main(base[:-1] + ["--lm-windows", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate: error:") and "lm_windows=1" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data-dir", "/nonexistent/data"], "data folder '/nonexistent/data/wikitext2_raw_test' does not exist"),
        (["--tasks", "lm,summaries"], "unknown task 'summaries'"),
        (["--budgets", "0.3,1.5"], "budget 1.5 is outside (0, 1]"),
        (["--budgets", "0"], "budget 0.0 is outside (0, 1]"),
        (["--budgets", "abc"], "budget 'abc' is not a number"),
        (["--modes", "prefill"], "unknown prefill mode 'prefill'"),
        (["--methods", "h2o"], "unknown method 'h2o'"),
        (["--schedule", "/nonexistent/s.json"], "cannot read schedule '/nonexistent/s.json'"),
        (["--samples", "0"], "--samples must be at least 1"),
    ],
)
def test_bad_inputs_give_one_line_errors(extra, message, capsys):
    assert main(["eval", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calibrate: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_schedule_for_another_model_fails_before_any_baseline(tiny_model_dir: Path, repo_root: Path,
                                                               shared_data: Path, tmp_path: Path, capsys):  # fmt: skip
    out = tmp_path / "eval"
    gemma = repo_root / "schedules" / "gemma3-270m_b0.3.json"
    args = ["eval", "--model", str(tiny_model_dir), "--out-dir", str(out), "--tasks", "lm", "--lm-context", "128",
            "--lm-continuation", "8", "--lm-windows", "1", "--no-plots", "--schedule", str(gemma)]  # fmt: skip
    assert main(args) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(err) == 1 and err[0].startswith(f"calibrate: error: --schedule {gemma}: schedule has 18 layer"), err
    assert "results" not in captured.out and not (out / "results.json").exists()
