"""The experiment scripts behind README numbers run end to end and write their JSON (tiny model, tiny windows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibrate.experiments import allocation_ceiling, paired_kl


@pytest.fixture
def uniform_schedule(tiny_model_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from runtime.families import model_info
    from runtime.reference import at_budget

    info = model_info(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    return at_budget("uniform", info.num_layers, 0.3, prompt_tokens=128, model=info).save(tmp_path / "tiny_b0.3.json")


def test_allocation_ceiling_groups_schedules_with_their_budget(tiny_model_dir, shared_data, uniform_schedule, tmp_path):
    out = tmp_path / "nested" / "ceiling.json"  # a plain string path, a folder to create: as from the shell
    text = shared_data / "tinyshakespeare" / "input.txt"
    argv = [str(text), "--model", str(tiny_model_dir), "--schedules", str(uniform_schedule), "--budgets", "0.3"]
    allocation_ceiling.main([*argv, "--windows", "2", "--context", "128", "--continuation", "16", "--out", str(out)])
    result = json.loads(out.read_text())
    methods = [(r["budget"], r["method"]) for r in result["rows"]]
    # the schedule's KV fraction rounds to 0.3: scored beside that budget's uniform, not against a second one
    assert methods == [(0.3, "uniform"), (0.3, "in-sample water-fill"), (0.3, str(uniform_schedule))]
    assert len(result["curves"]) == 4 and all(len(c) == len(result["grid"]) for c in result["curves"])
    rows = {m: r for (_, m), r in zip(methods, result["rows"], strict=True)}
    assert rows["uniform"]["kl"] > 0 and rows[str(uniform_schedule)]["kl"] == pytest.approx(rows["uniform"]["kl"])


def test_paired_kl_writes_paired_windows(tiny_model_dir, uniform_schedule, tmp_path, capsys):
    out = tmp_path / "paired.json"
    argv = [str(uniform_schedule), "--model", str(tiny_model_dir), "--data", "wikitext2", "--windows", "3"]
    paired_kl.main([*argv, "--context", "128", "--continuation", "16", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["calibrated", "uniform", "pyramidkv", "pyramidinfer"]
    assert all(len(r["per_window_kl"]) == 3 for r in rows)
    assert "| wikitext2 |" in capsys.readouterr().out
