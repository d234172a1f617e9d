"""The schedule file: per-layer KV retention plus the settings that select which tokens stay.

A schedule is plain data (JSON with a format version). Loading one never executes code; every field is
validated and a bad file fails with one line that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
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


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise ScheduleError(f"schedule field '{field_name}': {problem}; {fix}")


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
    if s.budget is not None and (not isinstance(s.budget, (int, float)) or isinstance(s.budget, bool)):
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
    if not isinstance(sel.pool_kernel, int) or sel.pool_kernel < 1 or sel.pool_kernel % 2 == 0:
        _fail("selection.pool_kernel", f"{sel.pool_kernel!r} is not an odd positive integer", "use 1, 3, 5, 7...")
    if not (math.isfinite(sel.weight_max) and sel.weight_max > 0):
        _fail("selection.weight_max", f"{sel.weight_max} is not a positive number", "use e.g. 1.2")
    if not isinstance(s.decode.interval, int) or s.decode.interval < 1:
        _fail("decode.interval", f"{s.decode.interval!r} is not a positive integer", "use e.g. 32")
    cap = s.decode.max_tokens
    if cap is not None and (not isinstance(cap, int) or cap < s.sinks + s.window + 1):
        _fail(
            "decode.max_tokens",
            f"{cap!r} is below sinks + window + 1 = {s.sinks + s.window + 1}",
            "raise it or set it to null",
        )
    if s.head_ratios is not None:
        _validate_head_ratios(s)
    m = s.model
    if m is not None:
        if m.num_layers != len(s.ratios):
            _fail(
                "ratios",
                f"has {len(s.ratios)} entries but model '{m.name}' has {m.num_layers} layers",
                "give one ratio per layer",
            )
        if m.compressible is not None and len(m.compressible) != m.num_layers:
            _fail("model.compressible", f"has {len(m.compressible)} entries", f"give {m.num_layers} booleans")
        if s.head_ratios is not None and any(len(row) != m.num_kv_heads for row in s.head_ratios):
            _fail(
                "head_ratios",
                f"needs {m.num_kv_heads} shares per layer for model '{m.name}'",
                "give one share per KV head, or remove head_ratios",
            )


def _check_head_ratios_shape(rows: Any) -> None:
    if not isinstance(rows, list) or not all(
        isinstance(row, list) and row and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in row)
        for row in rows
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


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        _fail(where, f"expected an object, got {type(data).__name__}", "see Schedule in runtime/schedule.py")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        _fail(
            f"{where}.{unknown[0]}" if where else unknown[0],
            "is not a known field",
            f"remove it (known: {', '.join(sorted(known))})",
        )
    return data


def from_dict(data: Any) -> Schedule:
    data = dict(_build(Schedule, data, ""))
    version = data.get("format_version", None)
    if version != FORMAT_VERSION:
        _fail(
            "format_version",
            f"version {version!r} is not supported",
            f"re-create the schedule with this pyramidinfer (format {FORMAT_VERSION})",
        )
    if "ratios" not in data:
        _fail("ratios", "is missing", "give one retention ratio per layer")
    if not isinstance(data["ratios"], list) or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) for r in data["ratios"]
    ):
        _fail("ratios", "is not a list of numbers", "give one retention ratio per layer")
    for key in ("selection", "decode"):
        if key in data and data[key] is None:
            _fail(key, "is null", "remove it to use the defaults, or give an object")
    for key, cls in (("selection", Selection), ("decode", Decode), ("model", ModelInfo)):
        if data.get(key) is not None:
            try:
                data[key] = cls(**_build(cls, data[key], key))
            except TypeError as e:
                _fail(key, str(e), "see runtime/schedule.py for the fields")
    try:
        return Schedule(**data)
    except TypeError as e:
        _fail("schedule", str(e), "see runtime/schedule.py for the fields")
        raise  # unreachable


def load_schedule(path: str | os.PathLike) -> Schedule:
    """Read and validate a schedule file (JSON; never executed)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScheduleError(f"cannot read schedule '{p}': {e.strerror}; check the path") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"schedule '{p}' is not valid JSON (line {e.lineno}): fix or re-create the file") from None
    except ValueError as e:
        raise ScheduleError(f"schedule '{p}': {e}") from None
    return from_dict(data)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite value {name} is not allowed; use a ratio in (0, 1]")


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
