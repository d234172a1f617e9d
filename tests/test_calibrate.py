"""`calibrate run/profile/search` end to end on a tiny model: schedule, resume, budget, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime
from calibrate.cli import main
from calibrate.profiling import Profile
from runtime.reference import at_budget

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--quick",
        "--head-curves",
        "measured",  # the quick preset's default is fisher: these tests count measured curves
        "--context-length",
        "128",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture
def text(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare" / "input.txt"


def _trials(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("select state from trials")]


def _trials_so_far(db: Path) -> list[str]:
    """`_trials` for polling a run in progress: none yet while the file is missing or Optuna is still creating its
    tables (the file exists before they do), or while the writer holds the lock."""
    try:
        return _trials(db) if db.exists() else []
    except sqlite3.OperationalError:
        return []


def test_run_writes_a_loadable_schedule_within_budget(tiny_model_dir, text, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(_args(tiny_model_dir, text, out, "--budget", "0.4", "--trials", "6")) == 0
    schedule = runtime.load_schedule(out)
    assert schedule.kv_fraction(128) <= 0.4 + 4 / 128  # one token of rounding per layer at most
    assert schedule.budget == 0.4 and schedule.model.num_layers == 4
    prov = schedule.provenance
    baselines = {"uniform", "pyramidkv", "pyramidinfer", "sensitivity", "heads"}
    assert prov["trials"] == 6 and set(prov["baselines"]) == baselines
    assert prov["command"].startswith("calibrate run") and "torch" in prov["versions"]
    # the enqueued baselines are trials of the study, so the best is never worse than them on validation
    assert prov["margin_vs_best_baseline"] >= 0
    assert (tmp_path / "s.profile.json").is_file() and (tmp_path / "s.profile.safetensors").is_file()
    summary = json.loads((tmp_path / "s.profile.json").read_text())
    assert len(summary["sensitivity"]) == 4 and len(summary["ratio_for_95pct_recall"]) == 4
    # text and retrieval curves are kept apart (the allocation weighs them equally); their mean is `sensitivity`
    prof = Profile.load(tmp_path / "s")
    assert prof.part_names == ["text", "retrieval"] and prof.parts.shape == (2, 4, len(prof.grid))
    assert torch.allclose(prof.parts.mean(0), prof.sensitivity)
    assert list(summary["sensitivity_by_kind"]) == ["text", "retrieval"]
    # per-KV-head curves (the tiny model has 2 KV heads), per kind too
    assert prof.head_parts.shape == (2, 4, 2, len(prof.grid))
    assert torch.allclose(prof.head_parts.mean(0), torch.tensor(summary["head_sensitivity"]))
    # the runtime applies it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with runtime.apply(model, schedule):
        model.generate(model.dummy_inputs["input_ids"].clamp(max=100), max_new_tokens=3, do_sample=False)
    printed = capsys.readouterr().out
    assert "calibrated" in printed and "uniform" in printed


def test_rerun_resumes_and_reuses_the_profile(tiny_model_dir, text, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(_args(tiny_model_dir, text, out, "--trials", "5")) == 0
    db = out.with_suffix(".optuna.db")
    assert len(_trials(db)) == 5
    capsys.readouterr()
    assert main(_args(tiny_model_dir, text, out, "--trials", "7")) == 0
    printed = capsys.readouterr().out
    assert "profile: reusing" in printed and "has 5 finished trials of 7" in printed
    assert len(_trials(db)) == 7 and runtime.load_schedule(out).provenance["trials"] == 7


def test_killed_run_loses_no_finished_trial(tiny_model_dir, text, tmp_path):
    out = tmp_path / "s.json"
    db = out.with_suffix(".optuna.db")
    cmd = [sys.executable, "-m", "calibrate", *_args(tiny_model_dir, text, out, "--trials", "400")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if _trials_so_far(db).count("COMPLETE") >= 6:
                break
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = _trials(db).count("COMPLETE")
    assert finished >= 6 and not out.exists()
    assert main(_args(tiny_model_dir, text, out, "--trials", str(finished + 2))) == 0
    states = _trials(db)
    assert states.count("COMPLETE") + states.count("PRUNED") >= finished + 1  # resumed on top of the old ones
    assert out.exists()


def test_profile_then_search(tiny_model_dir, text, tmp_path):
    out = tmp_path / "p.json"
    base = _args(tiny_model_dir, text, out)
    assert main(["profile", *base[1:]]) == 0
    assert (tmp_path / "p.profile.json").exists() and not out.exists()
    assert main(["search", *base[1:], "--trials", "4"]) == 0
    assert runtime.load_schedule(out).provenance["trials"] == 4


def test_multi_budget_search_writes_one_schedule_per_budget(tiny_model_dir, text, tmp_path):
    out = tmp_path / "m.json"
    assert main(_args(tiny_model_dir, text, out, "--budgets", "0.3,0.6", "--trials", "10")) == 0
    from calibrate.views import find_profile

    for b in (0.3, 0.6):
        s = runtime.load_schedule(tmp_path / f"m_b{b:g}.json")
        assert s.budget == b and s.kv_fraction(128) <= b + 4 / 128
        # one profile for the study, found from each budget's file (no identical copy per budget)
        assert find_profile(tmp_path / f"m_b{b:g}.json") == tmp_path / "m"
        assert not (tmp_path / f"m_b{b:g}.profile.json").exists()


def test_warm_start_tries_an_earlier_schedules_parameters(tiny_model_dir, text, tmp_path, capsys):
    import optuna

    first = tmp_path / "old.json"
    assert main(_args(tiny_model_dir, text, first, "--trials", "4")) == 0
    doc = json.loads(first.read_text())
    params = {k: v for k, v in doc["provenance"]["params"].items() if k not in ("exponent", "mix", "slope")}
    doc["provenance"]["params"] = {**params, "shape": "linear", "slope": 0.37}  # one no baseline or sampler picks
    first.write_text(json.dumps(doc))
    out = tmp_path / "new" / "s.json"
    assert main(_args(tiny_model_dir, text, out, "--trials", "6", "--warm-start", str(first))) == 0
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out.with_suffix('.optuna.db')}")
    assert [t.params for t in study.trials if t.params.get("slope") == 0.37] == [doc["provenance"]["params"]]
    # without provenance parameters (a hand-made schedule) it fails in one line, before any work
    plain = at_budget("uniform", 4, 0.3).save(tmp_path / "plain.json")
    message = _error(_args(tiny_model_dir, text, tmp_path / "x.json", "--warm-start", str(plain)), capsys)
    assert "records no search parameters" in message and not (tmp_path / "x.profile.json").exists()


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("calibrate: error: "), err
    return errors[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budget", "1.5"], "outside (0, 1]"),
        (["--budget", "0.1"], "below the minimum"),
        (["--storage", "notaurl"], "not a database URL"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open Optuna storage"),
        (["--trials", "0"], "at least 1"),
    ],
)
def test_bad_inputs_fail_in_one_line(tiny_model_dir, text, tmp_path, capsys, extra, message):
    assert message in _error(_args(tiny_model_dir, text, tmp_path / "x.json", *extra), capsys)


def test_bad_data_and_outputs(tiny_model_dir, text, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "no text found" in _error(_args(tiny_model_dir, empty, tmp_path / "x.json"), capsys)
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be.")
    assert "calibration needs at least" in _error(_args(tiny_model_dir, short, tmp_path / "x.json"), capsys)
    assert "does not exist" in _error(_args(tiny_model_dir, tmp_path / "nope.txt", tmp_path / "x.json"), capsys)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
        blocked = tmp_path / "afile"
        blocked.write_text("")
        target = blocked / "x.json"
    else:
        target = locked / "x.json"
    assert "choose another --out" in _error(_args(tiny_model_dir, text, target), capsys)


def test_unknown_family_is_refused(text, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from calibrate.models import local_folder, resolve

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(local_folder(resolve(None))).save_pretrained(folder)
    err = _error(_args(folder, text, tmp_path / "x.json"), capsys)
    assert "supported families" in err


def test_no_search_water_fills_from_the_profile(tiny_model_dir, text, tmp_path):
    out = tmp_path / "n.json"
    assert main(_args(tiny_model_dir, text, out, "--budget", "0.5", "--no-search")) == 0
    schedule = runtime.load_schedule(out)
    assert abs(schedule.kv_fraction(128) - 0.5) <= 4 / 128 and "single-KV head" in schedule.provenance["method"]
    assert schedule.head_ratios is not None and len(schedule.head_ratios[0]) == 2
    assert not out.with_suffix(".optuna.db").exists()
    layers = tmp_path / "l.json"
    assert main(_args(tiny_model_dir, text, layers, "--budget", "0.5", "--no-search", "--no-per-head")) == 0
    schedule = runtime.load_schedule(layers)
    assert schedule.head_ratios is None and "single-layer" in schedule.provenance["method"]
    assert Profile.load(tmp_path / "l").head_parts is None


def test_profile_continuation_scores_the_same_windows_on_fewer_tokens(tiny_model_dir, text, tmp_path):
    """`--profile-continuation N`: the profile's text windows are the default's with only N continuation tokens (the
    search's validation windows keep theirs); it is part of the profile's key, and leaving it out keeps the key of
    every profile before the option."""
    from transformers import AutoTokenizer

    from calibrate.data import CalibrationSet
    from calibrate.settings import Settings

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = Settings(data=[str(text)], context_length=128)
    cut = Settings(data=[str(text)], context_length=128, profile_continuation=16)
    whole, fewer = CalibrationSet(tok, plain), CalibrationSet(tok, cut)
    for a, b in zip(whole.calib_text, fewer.calib_text, strict=True):
        assert torch.equal(a.context, b.context) and torch.equal(a.continuation[:16], b.continuation)
        assert b.continuation.numel() == 16 and b.scored.numel() == 16
    assert all(e.continuation.numel() == 128 for e in fewer.valid_text)
    assert "profile_continuation" not in plain.keyed() and cut.key() != plain.key()
    out = tmp_path / "c.json"
    assert main(_args(tiny_model_dir, text, out, "--profile-continuation", "16", "--no-search")) == 0
    assert Profile.load(tmp_path / "c").meta["settings"]["profile_continuation"] == 16


def test_every_source_is_in_calibration_and_validation():
    import torch

    from calibrate import data

    a = torch.arange(0, 4000)
    b = torch.arange(10000, 16000)
    calib, valid = data.calibration_split_each([a, b], 100, 3, 4)
    assert len(calib) == 3 and len(valid) == 4
    for part in (calib, valid):  # token values tell the source apart
        assert bool((part[:, 0] < 10000).any()) and bool((part[:, 0] >= 10000).any())
    seen_calib = set(calib.flatten().tolist())
    assert not seen_calib & set(valid.flatten().tolist())


def test_held_out_leaves_out_the_files_calibrated_on(tmp_path):
    from calibrate import data

    books = tmp_path / "books"
    books.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (books / name).write_text("text")
    kept, excluded = data.held_out([books], [books / "b.txt", tmp_path / "missing.txt"])
    assert [f.name for f in kept] == ["a.txt", "c.txt"] and [f.name for f in excluded] == ["b.txt"]
    kept, excluded = data.held_out([books], [books])
    assert kept == [] and len(excluded) == 3


def test_device_map_calibrates_a_split_model_like_the_whole(tiny_model_dir, text, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRAMIDINFER_CACHE", str(tmp_path / "cache"))  # accelerate's disk offload goes here
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    split |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(split))
    whole, parted = tmp_path / "whole" / "s.json", tmp_path / "parted" / "s.json"
    quick = ("--budget", "0.5", "--no-search")
    assert main(_args(tiny_model_dir, text, whole, *quick)) == 0
    assert main(_args(tiny_model_dir, text, parted, *quick, "--device-map", str(mapping))) == 0
    a, b = runtime.load_schedule(whole), runtime.load_schedule(parted)
    assert a.ratios == pytest.approx(b.ratios, abs=1e-6)
    assert b.provenance["settings"]["device_map"] == str(mapping)
