"""The schedule file format (runtime/schedule.py): round trip, validation messages, atomic save."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import runtime.schedule as schedule_mod
from runtime.schedule import Decode, ModelInfo, Schedule, ScheduleError, Selection, load_schedule


def full_schedule() -> Schedule:
    """A schedule whose every field differs from its default, nested ones included."""
    return Schedule(
        ratios=[1.0, 0.75, 0.5, 0.25],
        window=16,
        sinks=2,
        prefill_mode="drop",
        selection=Selection(
            method="recent", per_head=False, query_weighting="linear", weight_max=1.5, pooling="avg", pool_kernel=5
        ),
        decode=Decode(interval=8, max_tokens=512, stagger=True),
        model=ModelInfo(
            name="tiny",
            num_layers=4,
            num_kv_heads=3,
            head_dim=64,
            fingerprint="0123456789abcdef",
            compressible=[True, False, True, True],
        ),
        budget=0.4,
        context_length=4096,
        name="round-trip",
        provenance={"source": "test", "nested": {"a": [1, 2]}, "score": 0.5},
    )


def test_fixture_sets_every_field():
    """Guard for the round trip below: when a field is added, give it a non-default value above."""
    s = full_schedule()
    defaults = Schedule(ratios=[0.5])
    for f in dataclasses.fields(Schedule):
        # head_ratios needs per-head selection, which this fixture turns off: its round trip is in test_ragged.py
        if f.name in ("format_version", "head_ratios"):
            continue
        assert getattr(s, f.name) != getattr(defaults, f.name), f"full_schedule() leaves '{f.name}' at its default"
    for cls, obj in ((Selection, s.selection), (Decode, s.decode)):
        for f in dataclasses.fields(cls):
            assert getattr(obj, f.name) != getattr(cls(), f.name), f"{cls.__name__}.{f.name} left at its default"


def test_round_trip_every_field(tmp_path: Path):
    s = full_schedule()
    path = s.save(tmp_path / "s.json")
    loaded = load_schedule(path)
    assert loaded == s
    assert loaded.to_dict() == s.to_dict()
    assert isinstance(loaded.selection, Selection)
    assert isinstance(loaded.decode, Decode)
    assert isinstance(loaded.model, ModelInfo)
    assert loaded.model.compressible == [True, False, True, True]
    assert loaded.provenance["nested"] == {"a": [1, 2]}
    # and the file is plain JSON with the format version
    assert json.loads(path.read_text())["format_version"] == schedule_mod.FORMAT_VERSION


def test_round_trip_defaults(tmp_path: Path):
    s = Schedule(ratios=[0.3] * 30)
    assert load_schedule(s.save(tmp_path / "d.json")) == s


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def _valid() -> dict:
    return full_schedule().to_dict()


def _with(path: tuple, value) -> dict:
    d = _valid()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


def _without(key: str) -> dict:
    d = _valid()
    del d[key]
    return d


BAD = {
    "format_version 2": (_with(("format_version",), 2), "format_version"),
    "format_version missing": (_without("format_version"), "format_version"),
    "ratio 0": (_with(("ratios", 1), 0.0), "ratios[1]': 0.0 is outside (0, 1]"),
    "ratio above 1": (_with(("ratios", 2), 1.5), "ratios[2]': 1.5 is outside (0, 1]"),
    "ratio negative": (_with(("ratios", 0), -0.1), "ratios[0]': -0.1 is outside (0, 1]"),
    "ratio overflow": (json.dumps(_valid()).replace('"ratios": [1.0', '"ratios": [1e999'), "not a finite number"),
    "ratio NaN": (json.dumps(_valid()).replace('"ratios": [1.0', '"ratios": [NaN'), "non-finite value NaN"),
    "ratio Infinity": (json.dumps(_valid()).replace('"ratios": [1.0', '"ratios": [Infinity'), "Infinity"),
    "ratio -Infinity": (json.dumps(_valid()).replace('"ratios": [1.0', '"ratios": [-Infinity'), "-Infinity"),
    "ratios not numbers": (_with(("ratios",), ["a", "b", "c", "d"]), "is not a list of numbers"),
    "ratios empty": (_with(("ratios",), []), "'ratios': is empty"),
    "layers vs model": (_with(("model", "num_layers"), 30), "has 4 entries but model 'tiny' has 30 layers"),
    "compressible length": (_with(("model", "compressible"), [True]), "model.compressible"),
    "unknown top-level": (_with(("colour",), "red"), "'colour': is not a known field"),
    "unknown in selection": (_with(("selection", "temperature"), 1), "'selection.temperature': is not a known field"),
    "unknown in decode": (_with(("decode", "speed"), 1), "'decode.speed': is not a known field"),
    "unknown in model": (_with(("model", "vendor"), "x"), "'model.vendor': is not a known field"),
    "model field missing": (_with(("model",), {"name": "tiny"}), "'model'"),
    "pooling unknown": (_with(("selection", "pooling"), "median"), "selection.pooling"),
    "even pool kernel": (_with(("selection", "pool_kernel"), 4), "selection.pool_kernel"),
    "decode interval 0": (_with(("decode", "interval"), 0), "decode.interval"),
    "max_tokens too small": (_with(("decode", "max_tokens"), 10), "decode.max_tokens"),
    "stagger as text": (_with(("decode", "stagger"), "yes"), "decode.stagger"),
    "stagger as a number": (_with(("decode", "stagger"), 1), "decode.stagger"),
    "window 0": (_with(("window",), 0), "'window': must be at least 1"),
    "sinks negative": (_with(("sinks",), -1), "'sinks'"),
    "prefill mode": (_with(("prefill_mode",), "keep"), "prefill_mode"),
    "budget above 1": (_with(("budget",), 2.0), "'budget'"),
    "top level not an object": ([0.5, 0.5], "expected an object"),
    "invalid JSON": ('{"ratios": [0.5,', "is not valid JSON (line 1)"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_message(tmp_path: Path, case: str):
    data, expected = BAD[case]
    with pytest.raises(ScheduleError) as info:
        load_schedule(_write(tmp_path, data))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file_message(tmp_path: Path):
    with pytest.raises(ScheduleError, match="cannot read schedule .*No such file or directory; check the path"):
        load_schedule(tmp_path / "nope.json")


def test_directory_is_unreadable(tmp_path: Path):
    with pytest.raises(ScheduleError, match="cannot read schedule"):
        load_schedule(tmp_path)


def test_constructor_validates():
    with pytest.raises(ScheduleError, match=r"ratios\[0\]"):
        Schedule(ratios=[float("nan")])
    with pytest.raises(ScheduleError, match="has 2 entries but model"):
        Schedule(ratios=[0.5, 0.5], model=ModelInfo("m", 3, 1, 64, "f"))


@pytest.mark.parametrize("section", ["selection", "decode"])
def test_null_section_is_a_schedule_error(tmp_path: Path, section: str):
    with pytest.raises(ScheduleError):
        load_schedule(_write(tmp_path, _with((section,), None)))


def test_save_leaves_no_temp_files(tmp_path: Path):
    full_schedule().save(tmp_path / "s.json")
    full_schedule().save(tmp_path / "s.json")  # overwrite too
    assert sorted(os.listdir(tmp_path)) == ["s.json"]


def test_save_creates_parent_folders(tmp_path: Path):
    path = full_schedule().save(tmp_path / "a" / "b" / "s.json")
    assert load_schedule(path) == full_schedule()


def test_write_atomic_takes_a_string_path(tmp_path: Path):
    # the experiments pass argparse strings; a str once failed only after an 11-minute run
    target = tmp_path / "sub" / "out.json"
    assert schedule_mod.write_atomic(str(target), "{}\n") == target
    assert target.read_text() == "{}\n" and [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_serialisation_keeps_existing_file(tmp_path: Path):
    path = full_schedule().save(tmp_path / "s.json")
    before = path.read_bytes()
    bad = full_schedule()
    bad.provenance["unserialisable"] = object()
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.json"]


def test_failed_write_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = full_schedule().save(tmp_path / "s.json")
    before = path.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(schedule_mod.os, "fsync", disk_full)
    with pytest.raises(OSError):
        Schedule(ratios=[0.1] * 4).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.json"]


def test_kept_tokens_and_fraction():
    s = Schedule(ratios=[1.0, 0.5, 0.25, 0.1], sinks=4, window=32)
    # context = 100 - 36 = 64: keeps 64, 32, 16, ceil(6.4) = 7 context tokens, plus the 36 protected
    assert s.kept_tokens(100) == [100, 68, 52, 43]
    assert s.kv_fraction(100) == pytest.approx(263 / 400)
    # prompts no longer than sinks + window are kept whole
    assert s.kept_tokens(30) == [30, 30, 30, 30]


def test_fraction_counts_compressible_layers_only():
    model = ModelInfo("m", 4, 1, 64, "f", compressible=[False, True, True, False])
    s = Schedule(ratios=[0.1, 0.5, 0.5, 0.1], model=model)
    assert s.kept_tokens(100) == [100, 68, 68, 100]
    assert s.kv_fraction(100) == pytest.approx(0.68)
