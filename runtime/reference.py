"""Reference schedules: the hand-made shapes a calibrated schedule has to beat at equal KV memory.

    from runtime.reference import at_budget, pyramidkv_linear, rescale_to_budget
    s = at_budget("pyramidkv", num_layers=30, budget=0.3, prompt_tokens=2048)
    s.kv_fraction(2048)  # 0.3 (within one token per layer)

A ratio is the share of the context (the prompt minus sinks and recent window) that a layer keeps; a budget is
the mean KV fraction of the compressible layers after prefill, `Schedule.kv_fraction(prompt_tokens)`, which also
counts the always-kept sinks and window. Pure functions: this module imports nothing but the schedule module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .schedule import Schedule, ScheduleError, group_heads, heads_compressible, kept_tokens

KINDS = ("uniform", "pyramidkv", "pyramidinfer", "all_ones")
DEFAULT_PROMPT_TOKENS = 2048
_BISECT_STEPS = 200


# ---------------------------------------------------------------- argument checks


def _check_layers(num_layers: Any) -> int:
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ScheduleError(f"num_layers {num_layers!r} is not a positive integer; give the model's layer count")
    return num_layers


def _check_unit(value: Any, what: str, fix: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what} {value!r} is not a number; {fix}") from None
    low_ok = v >= 0.0 if allow_zero else v > 0.0
    if not (math.isfinite(v) and low_ok and v <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ScheduleError(f"{what} {value!r} is outside {interval}; {fix}")
    return v


def _check_ratio(ratio: Any) -> float:
    return _check_unit(ratio, "ratio", "use a retention ratio in (0, 1]")


def _check_budget(budget: Any) -> float:
    return _check_unit(budget, "budget", "use a mean KV fraction in (0, 1], e.g. 0.3")


def _check_tokens(prompt_tokens: Any) -> int:
    if not isinstance(prompt_tokens, int) or isinstance(prompt_tokens, bool) or prompt_tokens < 1:
        raise ScheduleError(f"prompt_tokens {prompt_tokens!r} is not a positive integer; use e.g. 2048")
    return prompt_tokens


def _make(ratios: list[float], kind: str, params: dict[str, Any], kw: dict[str, Any]) -> Schedule:
    kw = dict(kw)
    provenance = {"reference": kind, **params, **kw.pop("provenance", {})}
    if "name" not in kw:
        kw["name"] = "-".join([kind] + [f"{k}{v:g}" for k, v in params.items() if isinstance(v, (int, float))])
    return Schedule(ratios=[min(1.0, r) for r in ratios], provenance=provenance, **kw)


# ---------------------------------------------------------------- shapes


def all_ones(num_layers: int, **kw: Any) -> Schedule:
    """Keep everything: the full cache, as a schedule (KV fraction 1)."""
    return _make([1.0] * _check_layers(num_layers), "all_ones", {}, kw)


def uniform(num_layers: int, ratio: float, **kw: Any) -> Schedule:
    """Every layer keeps the same share of the context (SnapKV-style uniform selection)."""
    r = _check_ratio(ratio)
    return _make([r] * _check_layers(num_layers), "uniform", {"ratio": r}, kw)


def pyramidkv_ratios(num_layers: int, ratio: float, beta: float = 20) -> list[float]:
    """PyramidKV's per-layer ratios: linear in depth from a maximum at layer 0 to a minimum at the last layer.

    min = ratio / beta, max = 2 * ratio - min, so the mean is `ratio`. When max would exceed 1 (ratio above
    1 / (2 - 1/beta), about 0.51 for beta 20) the first layer is clipped to 1 and the excess goes to the deeper
    layers by raising the minimum to 2 * ratio - 1: the line stays straight and the mean stays `ratio` (this is
    what PyramidKV's own code does when the maximum exceeds the prompt).
    """
    n = _check_layers(num_layers)
    r = _check_ratio(ratio)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 1):
        raise ScheduleError(f"beta {beta!r} must be a number >= 1; PyramidKV uses 20 (1 gives a uniform schedule)")
    if n == 1:
        return [r]
    low = r / beta
    high = 2 * r - low
    if high > 1.0:
        high, low = 1.0, 2 * r - 1.0
    return [min(1.0, high - (high - low) * layer / (n - 1)) for layer in range(n)]


def pyramidkv_linear(num_layers: int, ratio: float, beta: float = 20, **kw: Any) -> Schedule:
    """PyramidKV (Cai et al. 2024): linear per-layer budgets with mean `ratio`; see `pyramidkv_ratios`."""
    return _make(pyramidkv_ratios(num_layers, ratio, beta), "pyramidkv", {"ratio": float(ratio), "beta": beta}, kw)


def pyramidinfer_ratios(num_layers: int, r: float = 0.9) -> list[float]:
    """PyramidInfer's schedule as its reference code computes it.

    Layer l shrinks the context it receives by s_l = (1 - r) * (cos(pi * l / L) + 1) / 2 + r, and each layer
    only sees what the previous one kept, so the ratio of layer l is the cumulative product of s_0..s_l
    (s_0 = 1: the first layer keeps everything).
    """
    n = _check_layers(num_layers)
    r = _check_unit(r, "r", "use the paper's 0.9 (or a value in [0, 1])", allow_zero=True)
    ratios, acc = [], 1.0
    for layer in range(n):
        acc *= (1.0 - r) * (math.cos(math.pi * layer / n) + 1.0) / 2.0 + r
        ratios.append(acc)
    return ratios


def pyramidinfer_cosine(num_layers: int, r: float = 0.9, **kw: Any) -> Schedule:
    """PyramidInfer (Yang et al. 2024): cumulative cosine decay; see `pyramidinfer_ratios`."""
    return _make(pyramidinfer_ratios(num_layers, r), "pyramidinfer", {"r": float(r)}, kw)


# ---------------------------------------------------------------- budgets


def _kv_fraction(ratios: Sequence[float], compressible: Sequence[bool], n: int, sinks: int, window: int) -> float:
    """Same arithmetic as `Schedule.kv_fraction`, without building (and validating) a schedule each time."""
    kept = [kept_tokens(r, n, sinks, window) for r, c in zip(ratios, compressible) if c]
    return sum(kept) / (len(kept) * n) if kept else 1.0


def min_kv_fraction(prompt_tokens: int, sinks: int, window: int) -> float:
    """The smallest KV fraction any schedule reaches: sinks and window are always kept."""
    return min(prompt_tokens, sinks + window) / prompt_tokens


def _solve(
    ratios_at: Callable[[float], list[float]],
    hi: float,
    budget: float,
    n: int,
    sinks: int,
    window: int,
    compressible: Sequence[bool],
) -> tuple[float, list[float]]:
    """Bisection on a parameter p in (0, hi] whose ratios grow with p, for `kv_fraction(n) == budget`.

    The KV fraction moves in whole tokens, so the result is the parameter on either side of the step that
    crosses the budget whose fraction is nearer to it.
    """
    minimum = min_kv_fraction(n, sinks, window)
    if budget < minimum - 1e-12:
        raise ScheduleError(
            f"budget {budget:g} is below the minimum {minimum:.4f} = (sinks {sinks} + window {window}) / "
            f"{n} prompt tokens; raise the budget, shrink the window or use longer prompts"
        )
    lo = 0.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if _kv_fraction(ratios_at(mid), compressible, n, sinks, window) >= budget:
            hi = mid
        else:
            lo = mid
    best = hi
    if lo > 0:
        above = _kv_fraction(ratios_at(hi), compressible, n, sinks, window) - budget
        below = budget - _kv_fraction(ratios_at(lo), compressible, n, sinks, window)
        if below < above:
            best = lo
    return best, ratios_at(best)


def rescale_to_budget(
    schedule_or_ratios: Schedule | Sequence[float],
    budget: float,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    sinks: int | None = None,
    window: int | None = None,
    **kw: Any,
) -> Schedule:
    """Scale a shape by one factor (clipping ratios at 1) so that `kv_fraction(prompt_tokens)` equals `budget`.

    `schedule_or_ratios` is a Schedule (its settings are kept; `sinks`/`window` override them when given) or a
    list of per-layer ratios (then `sinks`, `window` and `kw` build the Schedule). The result records the budget
    and `context_length = prompt_tokens`. It hits the budget to within one token per layer (1 / prompt_tokens);
    a budget below (sinks + window) / prompt_tokens is impossible and raises ScheduleError naming the minimum.
    """
    b = _check_budget(budget)
    n = _check_tokens(prompt_tokens)
    if isinstance(schedule_or_ratios, Schedule):
        base = schedule_or_ratios
        changes = {k: v for k, v in (("sinks", sinks), ("window", window)) if v is not None}
        if changes or kw:
            base = base.with_ratios(base.ratios, **changes, **kw)
    else:
        shape = [float(r) for r in schedule_or_ratios]
        if not shape:
            raise ScheduleError("the shape has no layers; give one ratio per layer")
        for i, r in enumerate(shape):
            if not (math.isfinite(r) and r > 0):
                raise ScheduleError(f"shape[{i}] = {r} is not a positive number; a shape needs ratios > 0")
        top = max(shape)
        extra = {k: v for k, v in (("sinks", sinks), ("window", window)) if v is not None}
        base = Schedule(ratios=[r / top for r in shape], **extra, **kw)
    if base.head_ratios is not None:
        return _rescale_heads(base, b, n)
    shape = list(base.ratios)
    factor, ratios = _solve(
        lambda f: [min(1.0, f * r) for r in shape],
        1.0 / min(shape),
        b,
        n,
        base.sinks,
        base.window,
        base.compressible(),
    )
    provenance = {**base.provenance, "budget": b, "prompt_tokens": n, "scale": factor}
    return base.with_ratios(ratios, budget=b, context_length=n, provenance=provenance)


def _rescale_heads(base: Schedule, b: float, n: int) -> Schedule:
    """Per-head shares scaled by one factor: every KV head counts as a layer of its own in the KV fraction (each
    layer has the same number of heads, so the mean over heads and layers is the schedule's fraction)."""
    h = len(base.head_ratios[0])
    units = [r for row in base.head_ratios for r in row]
    factor, flat = _solve(
        lambda f: [min(1.0, f * r) for r in units],
        1.0 / min(units),
        b,
        n,
        base.sinks,
        base.window,
        heads_compressible(base.compressible(), h),
    )
    provenance = {**base.provenance, "budget": b, "prompt_tokens": n, "scale": factor}
    return base.with_head_ratios(group_heads(flat, h), budget=b, context_length=n, provenance=provenance)


def at_budget(
    kind: str,
    num_layers: int,
    budget: float | None = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    **kw: Any,
) -> Schedule:
    """A reference schedule of `kind` whose KV fraction at `prompt_tokens` equals `budget`.

    kind: uniform | pyramidkv | pyramidinfer | all_ones. `beta` (pyramidkv) and `r` (pyramidinfer) pass through
    to the shape; other keywords (sinks, window, model, selection, ...) go to the Schedule.
    uniform scales one ratio; pyramidkv searches its mean ratio (PyramidKV's own budget parameter, so its
    clipping rule applies); pyramidinfer scales the cumulative cosine shape by one factor.
    """
    key = str(kind).lower().replace("-", "_")
    if key not in KINDS:
        raise ScheduleError(f"unknown reference kind '{kind}'; use one of {', '.join(KINDS)}")
    n = _check_tokens(prompt_tokens)
    if key == "all_ones":
        if budget is not None and _check_budget(budget) != 1.0:
            raise ScheduleError("all_ones keeps every token (KV fraction 1); leave out the budget or pick another kind")
        kw.setdefault("name", "all_ones")
        return all_ones(num_layers, budget=1.0, context_length=n, **kw)
    if budget is None:
        raise ScheduleError(f"reference '{key}' needs a budget; give a mean KV fraction in (0, 1], e.g. 0.3")
    b = _check_budget(budget)
    kw.setdefault("name", f"{key}-b{b:g}")
    if key == "uniform":
        schedule = rescale_to_budget(uniform(num_layers, 1.0, **kw), b, n)
        return schedule.with_ratios(schedule.ratios, provenance={**schedule.provenance, "ratio": schedule.ratios[0]})
    if key == "pyramidinfer":
        r = kw.pop("r", 0.9)
        return rescale_to_budget(pyramidinfer_cosine(num_layers, r, **kw), b, n)
    beta = kw.pop("beta", 20)
    probe = pyramidkv_linear(num_layers, 1.0, beta, **kw)  # settings (sinks, window, compressible) only
    ratio, _ = _solve(
        lambda p: pyramidkv_ratios(num_layers, p, beta),
        1.0,
        b,
        n,
        probe.sinks,
        probe.window,
        probe.compressible(),
    )
    schedule = pyramidkv_linear(num_layers, ratio, beta, **kw)
    provenance = {**schedule.provenance, "budget": b, "prompt_tokens": n}
    return schedule.with_ratios(schedule.ratios, budget=b, context_length=n, provenance=provenance)
