"""Bad input to the runtime: schedule files, `runtime.apply`'s schedule argument, `runtime.kv_bytes`.

Every bad input gets one line that names the problem, the field or argument, and the fix; a loaded document
either becomes a Schedule or raises ScheduleError, never another exception (checked with hypothesis).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model
from transformers.cache_utils import DynamicCache

import runtime
import runtime.schedule as schedule_mod
from runtime.schedule import MAX_FILE_BYTES, Schedule, ScheduleError, load_schedule

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "schedules" / "smollm2-135m-instruct_b0.3.json", REPO / "schedules" / "gemma3-270m_b0.3.json"]
VALID = [json.loads(p.read_text()) for p in SHIPPED]


def _doc(**changes: Any) -> dict:
    """The shipped SmolLM2 schedule with `changes`; a key "a.b" sets the nested field b of a."""
    d = copy.deepcopy(VALID[0])
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = d
        for k in parents:
            target = target[k]
        target[last] = value
    return d


def _text(**changes: Any) -> str:
    return json.dumps(_doc(**changes))


def _first_ratio_as(literal: str) -> str:
    """The document with `literal` put in front of its ratios (numbers json.dumps cannot write)."""
    return _text().replace('"ratios": [', f'"ratios": [{literal}, ', 1)


def _write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "s.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _symlink_to(target: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        if not Path(target).exists():
            pytest.skip(f"{target} does not exist here")
        link = tmp_path / "s.json"
        try:
            os.symlink(target, link)
        except (OSError, NotImplementedError):
            pytest.skip("os.symlink is not supported here")
        return link

    return make


def _fifo(tmp_path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "s.json"
    os.mkfifo(path)
    return path


def _oversize(tmp_path: Path) -> Path:
    # valid JSON padded past the limit: it would load if the size were not bounded
    return _write(tmp_path, _text() + " " * MAX_FILE_BYTES)


# name: (content, or a function of tmp_path that makes the file; words the one-line message must contain)
FILES: dict[str, tuple[str | bytes | Callable[[Path], Path], list[str]]] = {
    "integer of 401 digits": (_first_ratio_as("1" + "0" * 400), ["'ratios[0]'", "401 digits is too large"]),
    "integer of 5000 digits": (
        _text().replace('"interval": 32', '"interval": ' + "7" * 5000),
        ["'decode.interval'", "5000 digits is too large"],
    ),
    "integer beyond 2**53": (_text(context_length=2**53 + 1), ["'context_length'", "too large"]),
    "1e400": (_text().replace('"weight_max": 1.2', '"weight_max": 1e400'), ["'selection.weight_max'", "1e400"]),
    "NaN budget": (_text().replace('"budget": 0.3', '"budget": NaN'), ["'budget'", "non-finite value NaN"]),
    "Infinity in provenance": (
        _text().replace('"provenance": {', '"provenance": {"x": -Infinity, ', 1),
        ["'provenance.x'", "-Infinity"],
    ),
    "200,000 nested [": ("[" * 200_000, ["nests too deeply", "s.json"]),
    "binary bytes": (
        b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8,
        ["not a schedule file", "not UTF-8", "s.json"],
    ),
    "/bin/ls": (lambda tmp: Path("/bin/ls") if Path("/bin/ls").is_file() else pytest.skip("no /bin/ls"), ["/bin/ls"]),
    "UTF-16 file": (_text().encode("utf-16"), ["not UTF-8", "s.json"]),
    "symlink to /dev/zero": (_symlink_to("/dev/zero"), ["not a regular file", "s.json"]),
    "FIFO": (_fifo, ["not a regular file", "s.json"]),
    "over 16 MiB": (_oversize, ["larger than 16 MiB", "s.json"]),
    "directory": (lambda tmp: tmp, ["cannot read schedule", "it is a directory"]),
    "missing file": (lambda tmp: tmp / "nope.json", ["cannot read schedule", "nope.json", "No such file"]),
    '"no" as a boolean': (_text(**{"selection.per_head": "no"}), ["'selection.per_head'", "'no' is not true or false"]),
    "1 as a boolean": (
        _text(**{"model.compressible": [1] * 30}),
        ["'model.compressible'", "model.compressible[0] is 1"],
    ),
    "true as an integer": (_text(**{"decode.interval": True}), ["'decode.interval'", "true is not an integer"]),
    "32.0 as an integer": (_text(**{"decode.interval": 32.0}), ["'decode.interval'", "32.0 is not an integer"]),
    "true as a number": (_text(budget=True), ["'budget'", "true is not a number or null"]),
    '"30" as num_layers': (_text(**{"model.num_layers": "30"}), ["'model.num_layers'", "'30' is not an integer"]),
    '"abc" as weight_max': (
        _text(**{"selection.weight_max": "abc"}),
        ["'selection.weight_max'", "'abc' is not a number"],
    ),
    "number as a name": (_text(name=3), ["'name'", "3 is not a string"]),
    "list as a method": (_text(**{"selection.method": ["attention"]}), ["'selection.method'", "is not a string"]),
    "true as format_version": (_text(format_version=True), ["'format_version'", "version true is not supported"]),
    "null selection": (_text(selection=None), ["'selection'", "null is not an object"]),
    "string in head_ratios": (
        _text(head_ratios=[["x", *row[1:]] for row in VALID[0]["head_ratios"]]),
        ["'head_ratios'", "is not a list of lists of numbers", "head_ratios[0][0] is 'x'"],
    ),
    "repeated key": (_text().replace('"window": 32,', '"window": 32, "window": 64,'), ["'window' twice"]),
    "lone surrogate": (_text(name="\ud800"), ["'name'", "unpaired surrogate"]),
    "newline in an unknown key": (_text(**{"a\nb": 1}), ['["a\\nb"]', "is not a known field"]),
    "non-positive kv heads": (_text(**{"model.num_kv_heads": 0}), ["'model.num_kv_heads'", "not a positive integer"]),
}


@pytest.fixture
def alarm():
    """Turn a hang (a FIFO opened for reading waits for a writer) into a failure."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(signum, frame):
        raise TimeoutError("load_schedule hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case", list(FILES), ids=list(FILES))
def test_bad_file_is_one_line_schedule_error(tmp_path: Path, alarm, case: str):
    content, words = FILES[case]
    path = content(tmp_path) if callable(content) else _write(tmp_path, content)
    with pytest.raises(ScheduleError) as info:
        load_schedule(path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_num_layers_string_does_not_blame_the_ratios(tmp_path: Path):
    # it once said "ratios has 30 entries but model has 30 layers"
    with pytest.raises(ScheduleError) as info:
        load_schedule(_write(tmp_path, _text(**{"model.num_layers": "30"})))
    assert "ratios" not in str(info.value)


def test_byte_order_mark_and_every_shipped_schedule_load(tmp_path: Path):
    assert load_schedule(_write(tmp_path, b"\xef\xbb\xbf" + _text().encode())) == load_schedule(SHIPPED[0])
    for path in SHIPPED:
        assert isinstance(load_schedule(path), Schedule)


def test_an_unforeseen_failure_is_still_a_schedule_error_naming_the_field(tmp_path: Path, monkeypatch):
    """The last resort: a bug in a check (here, an injected one) must not leak another exception type."""
    path = _write(tmp_path, _text())
    real = schedule_mod._check_type

    def buggy(value, hint, where):
        if where == "selection.pooling":
            raise KeyError("boom")
        real(value, hint, where)

    monkeypatch.setattr(schedule_mod, "_check_type", buggy)
    with pytest.raises(
        ScheduleError, match=r"^schedule field 'selection.pooling': cannot be read \(KeyError: 'boom'\)"
    ):
        load_schedule(path)
    monkeypatch.setattr(schedule_mod, "_check_type", real)
    monkeypatch.setattr(schedule_mod, "validate", lambda s: 1 / 0)
    with pytest.raises(ScheduleError, match=r"^schedule: cannot be read \(ZeroDivisionError: division by zero\)"):
        load_schedule(tmp_path / "s.json")


# ---------------------------------------------------------------- runtime.apply and runtime.kv_bytes


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _schedule_file(model, tmp_path: Path) -> Path:
    return Schedule(ratios=[0.5] * 4, window=8, sinks=2, model=runtime.model_info(model)).save(tmp_path / "s.json")


@pytest.mark.parametrize("as_path", [str, Path], ids=["str", "Path"])
def test_apply_takes_a_schedule_path(llama, tmp_path: Path, as_path):
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with runtime.apply(llama, as_path(_schedule_file(llama, tmp_path))):
        out = llama(input_ids=ids)
    assert isinstance(runtime.cache_of(out), runtime.PyramidCache)
    assert runtime.cache_of(out).get_seq_length() == 40


@pytest.mark.parametrize(
    "bad, shown", [(3, "int 3"), ({"ratios": [0.5]}, "dict {'ratios': [0.5]}"), (None, "None"), (b"s.json", "bytes")]
)
def test_apply_rejects_what_is_no_schedule(llama, bad, shown: str):
    with pytest.raises(TypeError) as info, runtime.apply(llama, bad):
        pass
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("runtime.apply: schedule must be a runtime.Schedule or a path to a schedule file")
    assert f"got {shown}" in message and "runtime.load_schedule(path)" in message


def test_apply_with_a_bad_path_is_a_schedule_error(llama, tmp_path: Path):
    with (
        pytest.raises(ScheduleError, match="cannot read schedule .*nope.json"),
        runtime.apply(llama, tmp_path / "nope.json"),
    ):
        pass


@pytest.mark.parametrize("fn", ["kv_bytes", "cache_bytes"])
@pytest.mark.parametrize("bad, shown", [("not a cache", "str 'not a cache'"), (None, "None"), ((), "tuple ()")])
def test_byte_counts_reject_what_is_no_cache(fn: str, bad, shown: str):
    with pytest.raises(TypeError) as info:
        getattr(runtime, fn)(bad)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"runtime.{fn}: expected a transformers Cache")
    assert f"got {shown}" in message and "runtime.cache_of(out)" in message


def test_byte_counts_of_an_empty_cache():
    assert runtime.kv_bytes(DynamicCache()) == 0 == runtime.cache_bytes(DynamicCache())


# ---------------------------------------------------------------- properties: mutated schedule files

HUGE = st.sampled_from([2**53, 2**53 + 1, -(2**63), 10**30, 10**400, -(10**400)])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE
    | st.floats()  # nan and inf included
    | st.text(max_size=8)
    | st.sampled_from(["no", "true", "30", "", "\ud800", "a\nb", "attention", "evict"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
# text spliced into the file at a random place: what json.dumps never writes
TOKENS = ["NaN", "-Infinity", "1e400", "9" * 5000, "[" * 5000, '"\\ud800"', '"', ",", "}", "]", "\x00", "\\"]
OTHER_ENCODINGS = ["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]
# a value of the same JSON kind as the one it replaces: it passes the type checks and tests the value checks
SAME_KIND = {
    bool: st.booleans(),
    int: st.integers(-2, 100) | st.integers() | HUGE,
    float: st.floats(0, 1) | st.floats(),
    str: st.sampled_from(["attention", "recent", "random", "linear", "avg", "none", "drop", "evict"]) | st.text(),
}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a document (as key/index tuples), the document itself included."""
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated_docs(draw) -> Any:
    """A shipped schedule with one to three random edits: a value replaced (by any JSON or by one of its kind), a
    key deleted, an unknown key added, a list resized, a value wrapped in more nesting."""
    doc = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        typed = [p for p in paths if not p or p[0] != "provenance"]  # the fields the loader checks
        path = draw(st.sampled_from(typed) | st.sampled_from(paths))
        value = _get(doc, path)
        op = draw(st.sampled_from(["replace", "same kind", "same kind", "delete", "add key", "resize", "wrap"]))
        if op == "replace" or (op == "same kind" and type(value) not in SAME_KIND):
            new = draw(JSON)
        elif op == "same kind":
            new = draw(SAME_KIND[type(value)])
        elif op == "delete" and isinstance(value, dict) and value:
            new = dict(value)
            del new[draw(st.sampled_from(sorted(value)))]
        elif op == "add key" and isinstance(value, dict):
            new = {**value, draw(st.text(max_size=12)): draw(JSON)}
        elif op == "resize" and isinstance(value, list):
            extra = draw(st.lists(st.sampled_from(value) if value else JSON, max_size=3))
            new = value[: draw(st.integers(0, len(value)))] + extra
        else:
            new = draw(st.sampled_from([[value], {"x": value}, [[value]], None]))
        if not path:
            doc = new
        else:
            _get(doc, path[:-1])[path[-1]] = new
    return doc


@st.composite
def schedule_files(draw) -> bytes:
    """Bytes of a schedule file: a mutated document in some encoding, perhaps with a token spliced in, or noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    text = json.dumps(draw(mutated_docs()), allow_nan=True, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
    encoding = draw(st.sampled_from(OTHER_ENCODINGS)) if draw(st.integers(0, 4)) == 0 else "utf-8"
    data = text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf") else "replace")
    if draw(st.integers(0, 9)) == 0 and data:  # a flipped byte
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    return data


PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI cannot turn flaky
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(data=schedule_files())
def test_any_file_loads_or_is_a_one_line_schedule_error(tmp_path: Path, data: bytes):
    path = _write(tmp_path, data)
    try:
        schedule = load_schedule(path)
    except ScheduleError as e:
        assert "\n" not in str(e) and str(e).startswith(("schedule", "cannot read schedule"))
        return
    # what the loader accepts is a usable schedule that saves and reads back the same
    assert isinstance(schedule, Schedule)
    assert 0.0 < schedule.kv_fraction() <= 1.0
    assert load_schedule(schedule.save(tmp_path / "again.json")) == schedule


@settings(PROPERTY, max_examples=15)
@given(data=schedule_files())
# files that once made `calibrate show` print a traceback (too few generated examples to count on meeting them)
@example(data=b"\x80")
@example(data=_first_ratio_as("1" + "0" * 400).encode())
@example(data=b"[" * 200_000)
@example(data=_text(name="\ud800").encode())
def test_calibrate_show_exits_0_or_prints_one_error_line(tmp_path: Path, data: bytes):
    path = _write(tmp_path, data)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # an ASCII-only stdout is another matter (see show.py)
    env.pop("PYRAMIDINFER_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "calibrate", "show", str(path)], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert proc.returncode in (0, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    if proc.returncode == 2:
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("calibrate: error: "), proc.stderr
