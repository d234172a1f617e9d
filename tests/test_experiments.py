"""The experiment scripts behind README numbers run end to end and write their JSON (tiny model, tiny windows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibrate.experiments import allocation_ceiling, paired_kl

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
    assert list(rows) == ["calibrated", "uniform", "pyramidkv", "pyramidinfer"]
    assert all(len(r["per_window_kl"]) == 3 for r in rows.values())
    # the "calibrated" schedule here is uniform itself: same KL on every window, so it wins none
    assert rows["uniform"]["per_window_kl"] == pytest.approx(rows["calibrated"]["per_window_kl"])
    assert rows["uniform"]["calibrated_wins"] == 0
    assert "| wikitext2 |" in capsys.readouterr().out


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for main in (lambda a: paired_kl.main(["s.json", *a]), lambda a: allocation_ceiling.main(["text.txt", *a])):
        with pytest.raises(SystemExit, match="^error: cannot create folder"):
            main(["--model", "no-such-model", "--out", str(blocker / "x.json")])  # the model is never loaded
