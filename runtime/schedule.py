"""The schedule file: per-layer KV retention plus the settings that select which tokens stay.

A schedule is plain data (JSON with a format version). Loading one never executes code; every field is
validated and a bad file fails with one line that names the field and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

FORMAT_VERSION = 1

PrefillMode = Literal["evict", "drop"]


class ScheduleError(ValueError):
    """A schedule that cannot be used as it is; the message says which field is wrong and how to fix it."""


@dataclass
class Selection:
    """How a layer scores its cached tokens and picks the ones to keep.

    Scores are the attention probabilities of the most recent `window` queries over the cached keys.
    """

    method: Literal["attention", "recent", "random"] = "attention"  # baselines: StreamingLLM, a random floor
    per_head: bool = True  # each KV head keeps its own tokens; False shares one choice per layer (the paper)
    query_weighting: Literal["uniform", "linear"] = "uniform"  # "linear": later recent queries weigh more
    weight_max: float = 1.2  # weight of the latest query under "linear" (the earliest weighs 1.0)
    pooling: Literal["none", "avg", "max"] = "max"  # smooth scores over neighbours so spans survive together
    pool_kernel: int = 7


@dataclass
class Decode:
    """How a layer stays bounded while tokens are generated.

    Each trim re-scores and rewrites the whole layer, so it is paid once per `interval` tokens; between trims a layer
    holds up to `interval` extra slots (its spare room). 32 trims half as often as 16 for 32 / 2048 = 1.6% more KV
    at a 2048-token context.
    """

    interval: int = 32  # re-score and trim every this many new tokens
    max_tokens: int | None = None  # optional cap on tokens a layer keeps at each trim (it may grow by interval-1)
    # spread the layers' trims over the interval (layer i of L runs i * interval // L tokens ahead), so that a
    # decode step pays for about L / interval layers' trims instead of every layer's on every interval-th step
    stagger: bool = False

    def trims_after(self, fed: int, layer: int, layers: int) -> bool:
        """Whether `layer` (of `layers`) trims after the `fed`-th token fed one at a time since prefill."""
        offset = layer * self.interval // layers if self.stagger else 0
        return fed > 0 and (fed + offset) % self.interval == 0


@dataclass
class ModelInfo:
    """The model a schedule was calibrated for; checked when the schedule is applied."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    compressible: list[bool] | None = None  # False for layers the runtime never compresses (sliding window)


@dataclass
class Schedule:
    """Per-layer retention ratios and how to apply them.

    `ratios[l]` is the share of the context (the prompt minus sinks and recent window) that layer l keeps.
    `head_ratios[l][h]`, if given, is the share that KV head h of layer l keeps (per-head selection only); then
    `ratios[l]` is the mean over the layer's heads, and the layer holds exactly each head's own tokens.
    """

    ratios: list[float]
    window: int = 32
    sinks: int = 4
    prefill_mode: PrefillMode = "evict"
    selection: Selection = field(default_factory=Selection)
    decode: Decode = field(default_factory=Decode)
    model: ModelInfo | None = None
    budget: float | None = None
    context_length: int = 2048  # prompt length that `budget` refers to
    name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    head_ratios: list[list[float]] | None = None

    def __post_init__(self) -> None:
        self.ratios = [float(r) for r in self.ratios]
        if self.head_ratios is not None:
            _check_head_ratios_shape(self.head_ratios)
            self.head_ratios = [[float(r) for r in row] for row in self.head_ratios]
        validate(self)

    @property
    def num_layers(self) -> int:
        return len(self.ratios)

    def compressible(self) -> list[bool]:
        if self.model is not None and self.model.compressible is not None:
            return list(self.model.compressible)
        return [True] * self.num_layers

    def layer_head_ratios(self, layer: int) -> list[float] | None:
        """The per-head shares of `layer` where its heads keep different shares, else None."""
        row = self.head_ratios[layer] if self.head_ratios is not None else None
        return row if row is not None and len(set(row)) > 1 else None

    def mean_kept_tokens(self, prompt_tokens: int) -> list[float]:
        """Tokens each layer holds after prefilling `prompt_tokens` tokens (mean over its heads)."""
        kept = []
        for i, (r, c) in enumerate(zip(self.ratios, self.compressible(), strict=True)):
            shares = (self.layer_head_ratios(i) or [r]) if c else []
            k = [kept_tokens(x, prompt_tokens, self.sinks, self.window) for x in shares]
            kept.append(sum(k) / len(k) if k else prompt_tokens)
        return kept

    def kept_tokens(self, prompt_tokens: int) -> list[int]:
        """Tokens each layer holds after prefilling `prompt_tokens` tokens (per-head layers: the mean, rounded)."""
        return [round(k) for k in self.mean_kept_tokens(prompt_tokens)]

    def kv_fraction(self, prompt_tokens: int | None = None) -> float:
        """Mean KV memory of the compressible layers relative to the full cache, after prefill."""
        n = prompt_tokens or self.context_length
        kept = [k for k, c in zip(self.mean_kept_tokens(n), self.compressible(), strict=True) if c]
        return sum(kept) / (len(kept) * n) if kept else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["head_ratios"] is None:  # per-layer schedules read as before, also by older versions
            del d["head_ratios"]
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule as JSON, atomically: a reader never sees a half-written file."""
        validate(self)
        return write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def with_ratios(self, ratios: list[float], **changes: Any) -> Schedule:
        if [float(r) for r in ratios] != self.ratios:
            changes.setdefault("head_ratios", None)  # new layer shares: the old per-head split no longer applies
        changes.setdefault("selection", dataclasses.replace(self.selection))
        changes.setdefault("decode", dataclasses.replace(self.decode))
        changes.setdefault("provenance", dict(self.provenance))
        return dataclasses.replace(self, ratios=list(ratios), **changes)

    def with_head_ratios(self, head_ratios: list[list[float]], **changes: Any) -> Schedule:
        """A copy with these per-KV-head shares; each layer's ratio becomes the mean of its heads' shares."""
        return self.with_ratios(head_means(head_ratios), head_ratios=head_ratios, **changes)


def kept_tokens(ratio: float, prompt_tokens: int, sinks: int, window: int) -> int:
    """Tokens a layer keeps: sinks and recent window always, plus ceil(ratio * context)."""
    protected = min(prompt_tokens, sinks + window)
    context = prompt_tokens - protected
    return protected + min(context, math.ceil(ratio * context - 1e-9))


def head_means(head_ratios: Sequence[Sequence[float]]) -> list[float]:
    """Each layer's ratio under per-head shares: the mean over its KV heads (what `validate` requires)."""
    return [sum(row) / len(row) for row in head_ratios]


def heads_compressible(compressible: Sequence[bool], heads: int) -> list[bool]:
    """Per-head allocations treat every KV head as a unit of its own: the layer's flag, once per head, in the
    order `[h for row in head_ratios for h in row]` flattens shares."""
    return [c for c in compressible for _ in range(heads)]


def group_heads(flat: Sequence[Any], heads: int) -> list[list[Any]]:
    """Flat per-head values (layer-major) back into one row of `heads` values per layer."""
    return [list(flat[i : i + heads]) for i in range(0, len(flat), heads)]


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text or bytes) to `path` so that readers see the old file or the whole new one, never a part:
    a temporary file in the same folder, synced, then renamed over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file the user asked for, not our temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file should look like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- validation


def _fail(field_name: str, problem: str, fix: str) -> NoReturn:
    where = f"schedule field '{field_name}'" if field_name else "schedule"
    raise ScheduleError(f"{where}: {problem}; {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a schedule


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_value(value: Any) -> str:
    """A JSON value as an error message quotes it: short, on one line, in JSON's words (true, null)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) and value.bit_length() > 64:  # str() of a huge int is slow, even refused
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "an object"
    return _clip(repr(value))  # repr escapes newlines and unprintable characters


def describe(value: Any) -> str:
    """A Python argument and its type for a one-line error: "int 3", "str 'abc'", "a LlamaForCausalLM"."""
    if value is None:
        return "None"
    try:
        text = repr(value)
    except Exception:  # any object may be passed; its repr must not turn one error into another
        text = ""
    if not text or len(text) > 40 or not text.isprintable():
        return f"a {type(value).__name__}"
    return f"{type(value).__name__} {text}"


def validate(s: Schedule) -> None:
    if s.format_version != FORMAT_VERSION:
        _fail(
            "format_version",
            f"version {s.format_version} is not supported",
            f"re-create the schedule with this pyramidinfer (format {FORMAT_VERSION})",
        )
    if not s.ratios:
        _fail("ratios", "is empty", "give one retention ratio per layer")
    for i, r in enumerate(s.ratios):
        if not math.isfinite(r):
            _fail(f"ratios[{i}]", f"{r} is not a finite number", "use a ratio in (0, 1]")
        if not 0.0 < r <= 1.0:
            _fail(f"ratios[{i}]", f"{r} is outside (0, 1]", "use a ratio in (0, 1]; 1 keeps the whole layer")
    for name in ("window", "sinks", "context_length"):
        v = getattr(s, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            _fail(name, f"{v!r} is not a non-negative integer", "use a whole number >= 0")
    if s.context_length < 1:
        _fail("context_length", "must be at least 1", "give the prompt length the budget refers to, e.g. 2048")
    if s.window < 1:
        _fail("window", "must be at least 1", "the recent window scores the context; use e.g. 32")
    if not isinstance(s.name, str):
        _fail("name", f"{s.name!r} is not a string", "use a short text name")
    if not isinstance(s.provenance, dict):
        _fail("provenance", "is not an object", "use a JSON object (or {})")
    if not isinstance(s.selection, Selection) or not isinstance(s.decode, Decode):
        _fail("selection", "or decode is not an object", "give JSON objects for selection and decode")
    if s.prefill_mode not in ("evict", "drop"):
        _fail("prefill_mode", f"{s.prefill_mode!r} is unknown", "use 'evict' or 'drop'")
    if s.budget is not None and not _is_number(s.budget):
        _fail("budget", f"{s.budget!r} is not a number", "use a mean KV fraction in (0, 1] or null")
    if s.budget is not None and not (math.isfinite(s.budget) and 0.0 < s.budget <= 1.0):
        _fail("budget", f"{s.budget} is outside (0, 1]", "use a mean KV fraction in (0, 1]")
    sel = s.selection
    if sel.method not in ("attention", "recent", "random"):
        _fail("selection.method", f"{sel.method!r} is unknown", "use 'attention', 'recent' or 'random'")
    if sel.query_weighting not in ("uniform", "linear"):
        _fail("selection.query_weighting", f"{sel.query_weighting!r} is unknown", "use 'uniform' or 'linear'")
    if sel.pooling not in ("none", "avg", "max"):
        _fail("selection.pooling", f"{sel.pooling!r} is unknown", "use 'none', 'avg' or 'max'")
    if not _is_int(sel.pool_kernel) or sel.pool_kernel < 1 or sel.pool_kernel % 2 == 0:
        _fail("selection.pool_kernel", f"{sel.pool_kernel!r} is not an odd positive integer", "use 1, 3, 5, 7...")
    if not (_is_number(sel.weight_max) and math.isfinite(sel.weight_max) and sel.weight_max > 0):
        _fail("selection.weight_max", f"{show_value(sel.weight_max)} is not a positive number", "use e.g. 1.2")
    if not _is_int(s.decode.interval) or s.decode.interval < 1:
        _fail("decode.interval", f"{s.decode.interval!r} is not a positive integer", "use e.g. 32")
    cap = s.decode.max_tokens
    if cap is not None and (not _is_int(cap) or cap < s.sinks + s.window + 1):
        _fail(
            "decode.max_tokens",
            f"{cap!r} is below sinks + window + 1 = {s.sinks + s.window + 1}",
            "raise it or set it to null",
        )
    if s.head_ratios is not None:
        _validate_head_ratios(s)
    m = s.model
    if m is not None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):  # checked first: the comparisons below need them
            if not _is_int(getattr(m, name)) or getattr(m, name) < 1:
                _fail(f"model.{name}", f"{show_value(getattr(m, name))} is not a positive integer", "use e.g. 30")
        if m.num_layers != len(s.ratios):
            _fail(
                "ratios",
                f"has {len(s.ratios)} entries but model {show_value(m.name)} has {m.num_layers} layers",
                "give one ratio per layer",
            )
        if m.compressible is not None and len(m.compressible) != m.num_layers:
            _fail("model.compressible", f"has {len(m.compressible)} entries", f"give {m.num_layers} booleans")
        if s.head_ratios is not None and any(len(row) != m.num_kv_heads for row in s.head_ratios):
            _fail(
                "head_ratios",
                f"needs {m.num_kv_heads} shares per layer for model {show_value(m.name)}",
                "give one share per KV head, or remove head_ratios",
            )


def _check_head_ratios_shape(rows: Any) -> None:
    if not isinstance(rows, list) or not all(
        isinstance(row, list) and row and all(_is_number(r) for r in row) for row in rows
    ):
        _fail("head_ratios", "is not a list of lists of numbers", "give one list of per-KV-head shares per layer")


def _validate_head_ratios(s: Schedule) -> None:
    rows = s.head_ratios
    if len(rows) != len(s.ratios):
        _fail("head_ratios", f"has {len(rows)} rows for {len(s.ratios)} layers", "give one row per layer")
    if len({len(row) for row in rows}) != 1:
        _fail("head_ratios", "rows differ in length", "give every layer one share per KV head")
    if not s.selection.per_head:
        _fail("head_ratios", "needs per-head selection", "set selection.per_head to true, or remove head_ratios")
    for i, (row, mean) in enumerate(zip(rows, head_means(rows), strict=True)):
        for h, r in enumerate(row):
            if not (math.isfinite(r) and 0.0 < r <= 1.0):
                _fail(f"head_ratios[{i}][{h}]", f"{r} is outside (0, 1]", "use a share in (0, 1]")
        if abs(mean - s.ratios[i]) > 1e-6:
            _fail(
                f"ratios[{i}]",
                f"is {s.ratios[i]:.6g} but its heads' shares average {mean:.6g}",
                "set each ratio to the mean of its layer's head_ratios",
            )


# ---------------------------------------------------------------- loading

MAX_FILE_BYTES = 16 * 2**20  # a schedule is a few KiB of JSON: anything larger is the wrong file
_MAX_INT = 2**53  # larger counts are never meant, and the token arithmetic (floats) would lose them
_MAX_DIGITS = 100  # longer integer literals are not converted at all: int() of a huge string is slow or refused
_TOO_LARGE = "use a number of a sensible size (at most 2**53)"


@dataclass(frozen=True)
class _Unreadable:
    """Stands in for a JSON value that is not data we accept (NaN, 1e400, a 5000-digit integer, an object with a
    repeated key) until the walk over the document can name the field it sits in."""

    problem: str
    fix: str


def _parse_int(text: str) -> int | _Unreadable:
    if len(text) > _MAX_DIGITS:
        return _Unreadable(f"an integer of {len(text.lstrip('-'))} digits is too large", _TOO_LARGE)
    return int(text)


def _parse_float(text: str) -> float | _Unreadable:
    value = float(text)
    if not math.isfinite(value):  # 1e400: json would silently make it inf
        return _Unreadable(f"{_clip(text)} is not a finite number", "use a finite number")
    return value


def _parse_constant(name: str) -> _Unreadable:
    return _Unreadable(f"non-finite value {name} is not allowed", "use a finite number, e.g. a ratio in (0, 1]")


def _parse_object(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _Unreadable:
    obj = dict(pairs)
    if len(obj) < len(pairs):  # json would silently keep the last one
        twice = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        return _Unreadable(f"has the key {show_value(twice)} twice", "keep only one of them")
    return obj


def _reject_unreadable(data: Any) -> None:
    """Fail on the first value in document order that json parsed but we do not accept, naming its field.

    Iterative, not recursive: a document may nest as deep as the JSON parser allows.
    """
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _Unreadable):
            _fail(where, value.problem, value.fix)
        if isinstance(value, str) and not _is_text(value):
            _fail(where, "contains an unpaired surrogate escape (e.g. \\ud800)", "write valid Unicode text")
        if isinstance(value, dict):
            for key in value:
                if not _is_text(key):
                    _fail(where, "has a key with an unpaired surrogate escape (e.g. \\ud800)", "write valid Unicode")
            stack.extend(reversed([(_key(where, k), v) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)]))


def _is_text(s: str) -> bool:
    """Whether `s` is real Unicode: JSON escapes can spell lone surrogates, which cannot even be printed."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# What a field of each type must be in JSON, and how to write it. No coercion: "30" is no integer, 1 is no boolean.
_NOUNS = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"), float: ("a number", "numbers")}
_NOUNS |= {str: ("a string", "strings"), dict: ("an object", "objects"), list: ("a list", "lists")}
_FIXES = {
    bool: "write true or false, without quotes",
    int: "write a whole number, without quotes or a decimal point",
    float: "write a number, without quotes",
    str: "write text in double quotes",
    dict: "write a JSON object",
    list: "write a JSON list",
}


def _base(hint: Any) -> Any:
    """The JSON kind of an annotation: bool, int, float, str, list or dict (dataclasses and Literal included)."""
    origin = get_origin(hint)
    if origin is Literal:
        return str  # which strings are allowed is validate()'s business
    if origin in (list, dict):
        return origin
    return dict if dataclasses.is_dataclass(hint) else hint


def _optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` as (X, True); any other annotation as (it, False)."""
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _noun(hint: Any, plural: bool = False) -> str:
    hint, optional = _optional(hint)
    if get_origin(hint) is list:
        words = f"{'lists' if plural else 'a list'} of {_noun(get_args(hint)[0], plural=True)}"
    else:
        words = _NOUNS[_base(hint)][plural]
    return f"{words} or null" if optional else words


def _misfit(value: Any, hint: Any, where: str) -> tuple[str, Any, Any] | None:
    """The first (path, value, annotation) inside `value` that is not of type `hint`, or None if all fit.

    Numbers beyond 2**53 fail here at once: they have the right type but can only be a mistake.
    """
    hint, optional = _optional(hint)
    if value is None and optional:
        return None
    kind = _base(hint)
    fits = {
        bool: isinstance(value, bool),
        int: _is_int(value),
        float: _is_number(value),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(kind)
    if fits is None:
        if hint is Any:
            return None
        raise TypeError(f"schedule fields of type {hint} cannot be read from JSON yet")  # a new field type
    if not fits:
        return where, value, hint
    if kind in (int, float) and abs(value) > _MAX_INT:
        _fail(where, f"{show_value(value)} is too large", _TOO_LARGE)
    if kind is list:
        for i, item in enumerate(value):
            if bad := _misfit(item, get_args(hint)[0], f"{where}[{i}]"):
                return bad
    return None


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Fail unless the JSON `value` of field `where` has the type its annotation `hint` asks for."""
    if bad := _misfit(value, hint, where):
        path, item, item_hint = bad
        fix = _FIXES[_base(_optional(item_hint)[0])]
        if path == where:
            _fail(where, f"{show_value(item)} is not {_noun(hint)}", fix)
        _fail(where, f"is not {_noun(hint)}: {path} is {show_value(item)}", fix)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _key(where: str, key: Any) -> str:
    """The path of `key` inside `where`: selection.pooling, or provenance["odd key"] for keys that are no names
    (quoted, so that a key with a newline cannot break the one-line message)."""
    if isinstance(key, str) and key.isidentifier() and key.isascii():
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key) if isinstance(key, str) else show_value(key)}]"


@contextlib.contextmanager
def _last_resort(where: str) -> Iterator[None]:
    """A failure nobody foresaw while reading field `where` still comes out as a ScheduleError naming it."""
    try:
        yield
    except ScheduleError:
        raise
    except Exception as e:
        text = _clip(" ".join(str(e).split()), 120)
        _fail(where, f"cannot be read ({type(e).__name__}: {text})", "fix the field or re-create the schedule")


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The fields of dataclass `cls` from the JSON object `data`: known keys only, required ones present, each
    value of its annotated type, nested dataclasses built."""
    if not isinstance(data, dict):
        _fail(
            where,
            f"expected an object, got {show_value(data)}",
            f"give a JSON object with the fields of {cls.__name__}",
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            _fail(_key(where, key), "is not a known field", f"remove it (known: {', '.join(sorted(fields))})")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        names = ", ".join(f"'{name}'" for name in missing)
        _fail(
            where,
            f"lacks {names}",
            f"add {'it' if len(missing) == 1 else 'them'} (see {cls.__name__} in runtime/schedule.py)",
        )
    values = {}
    for name, value in data.items():
        path, (hint, _) = _key(where, name), _optional(_hints(cls)[name])
        with _last_resort(path):
            if dataclasses.is_dataclass(hint) and value is not None:
                values[name] = hint(**_fields(hint, value, path))
            else:
                _check_type(value, _hints(cls)[name], path)
                values[name] = value
    return values


def from_dict(data: Any) -> Schedule:
    """A schedule from its parsed JSON; anything that does not fit is a one-line ScheduleError naming the field."""
    if isinstance(data, dict):  # first: a newer file should say so, not fail on the fields it added
        version = data.get("format_version")
        if "format_version" not in data or not _is_int(version) or version != FORMAT_VERSION:
            _fail(
                "format_version",
                "is missing" if "format_version" not in data else f"version {show_value(version)} is not supported",
                f"re-create the schedule with this pyramidinfer (format {FORMAT_VERSION})",
            )
    with _last_resort(""):
        return Schedule(**_fields(Schedule, data, ""))


def load_schedule(path: str | os.PathLike) -> Schedule:
    """Read and validate a schedule file: UTF-8 JSON of at most 16 MiB, parsed as data (never executed)."""
    p = Path(path)
    text = _read_text(p)
    try:
        data = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_parse_object,
        )
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}): {e.msg} at column {e.colno}"
        raise ScheduleError(f"schedule '{p}' is not valid JSON ({where}; fix or re-create the file") from None
    except RecursionError:
        raise ScheduleError(f"schedule '{p}' nests too deeply to be a schedule; check the path") from None
    _reject_unreadable(data)
    return from_dict(data)


def _read_text(p: Path) -> str:
    """The file's text, read with a bound: a FIFO, /dev/zero or a huge file fails at once instead of hanging."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat of the opened file then rejects it (no race)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise ScheduleError(f"cannot read schedule '{p}': it is {kind}; give the path of a schedule .json file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as e:
        raise ScheduleError(f"cannot read schedule '{p}': {e.strerror or e}; check the path") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScheduleError(
            f"schedule '{p}' is larger than {MAX_FILE_BYTES // 2**20} MiB, too large for a schedule; check the path"
        )
    try:
        return raw.decode("utf-8-sig")  # strict UTF-8; a leading byte order mark (some editors write one) is no data
    except UnicodeDecodeError as e:
        raise ScheduleError(
            f"schedule '{p}' is not a schedule file (not UTF-8 text/JSON: byte {e.start}); "
            "give the .json file that calibrate wrote"
        ) from None


# ---------------------------------------------------------------- model identity


def config_fingerprint(config: Any) -> str:
    """A short hash of the architecture fields a schedule depends on."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    keys = (
        "model_type",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_size",
        "vocab_size",
        "layer_types",
        "sliding_window",
    )
    data = {k: getattr(text_config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
