"""Side-by-side speed and memory of a schedule and three stock baselines, measured in one run.

The configurations, each warmed (one untimed prefill and a few decode steps) before anything is timed:

- `stock_dynamic`: the stock model with transformers' `DynamicCache`, whose `torch.cat` append re-copies the
  whole cache every token: a slow baseline, so the schedule's ratio against it overstates what compression gives.
- `stock_static`: the stock model with a preallocated `StaticCache` sized for the prompt and the fed decode tokens:
  the honest baseline.
- `precut`: the stock model with a `StaticCache` that holds only as many tokens as the schedule keeps, i.e. stock
  attention on the last `round(kv_fraction * context)` tokens of the same prompts: the physical limit of what
  compression can give at this KV share (same weights, same batch, no scoring or trimming).
- `schedule`: the model under `runtime.apply(model, schedule)`.

Machines are noisy, so the runs of one repeat go in turn and the order reverses every other repeat; each figure is
the median over repeats. Only the ratios are meant to be compared, and only within one run.

Step times: every decode step is timed on its own (CUDA events on a GPU, so nothing syncs between steps; the
clock on a CPU). The KV bytes are read between steps, outside the timed windows, and decode tokens/s is the
batch times the steps over the sum of the step times. A schedule step is a *trim step* when the tokens fed since
prefill are a multiple of `schedule.decode.interval`: that is when `PyramidCache` is due to re-score and trim
(a layer already within its target skips the work); the baselines have only plain steps.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicCache

import runtime
from runtime.schedule import Schedule

CONFIGS = ("stock_dynamic", "stock_static", "precut", "schedule")
LABELS = {
    "stock_dynamic": "stock DynamicCache",
    "stock_static": "stock StaticCache",
    "precut": "pre-cut reference",
    "schedule": "schedule",
    "other": "--against schedule",
}
# how the schedule's ratio against each baseline is labelled: schedule / baseline
AGAINST = {
    "stock_static": "vs stock StaticCache",
    "stock_dynamic": "vs stock DynamicCache",
    "precut": "of the pre-cut limit",
    "other": "vs the --against schedule",
}
WARM_STEPS = 3  # untimed decode steps after the warm-up prefill (the schedule also runs to its first trim)


def warm_steps(schedule: Schedule | None, new_tokens: int) -> int:
    """Tokens of an untimed warm-up run: a few decode steps, and with a schedule through its first trim (a trim
    allocates what plain steps do not), never more than the timed runs generate."""
    steps = WARM_STEPS if schedule is None else max(WARM_STEPS, schedule.decode.interval)
    return min(new_tokens, steps + 1)


@dataclass
class RunStats:
    prefill_s: float
    decode_tokens_per_s: float  # batch * decode steps / sum of the step times
    kv_bytes_prefill: int
    kv_bytes_end: int
    kv_bytes_peak: int
    peak_memory_bytes: int  # process memory above what it held before the run (CUDA: allocator peak)
    prompt_tokens: int = 0  # tokens per row prefilled (the pre-cut reference: fewer)
    decode_steps: int = 0
    plain_step_ms_mean: float = 0.0
    plain_step_ms_max: float = 0.0
    trim_steps: int = 0  # steps at which the schedule was due to trim (0 for the stock caches)
    trim_step_ms_mean: float | None = None  # None: no trim step
    trim_step_ms_max: float | None = None
    cache_bytes_end: int = 0  # keys and values plus the cache's per-slot bookkeeping and recent queries, at the end


def _release_freed_memory() -> None:
    """Hand memory freed by earlier runs back to the OS (glibc keeps it), so "above start" is not understated."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then be low for later runs
        pass


class _PeakRSS:
    """Samples the process's resident memory in a thread: torch's CPU allocations are invisible to tracemalloc."""

    def __init__(self, interval: float = 0.005):
        import psutil

        _release_freed_memory()
        self._proc = psutil.Process()
        self._interval = interval
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """Times single steps: CUDA events on a GPU (read once at the end, no sync between steps), else the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def start(self) -> None:
        self._marks.append(self._now())

    def stop(self) -> None:
        self._marks.append(self._now())

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> list[float]:
        """Each step's duration; on CUDA call it after a sync."""
        pairs = zip(self._marks[::2], self._marks[1::2], strict=True)
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def is_trim_step(step: int, schedule: Schedule | None, layers: int) -> bool:
    """Whether decode step `step` (1-based: tokens fed since prefill) is one where some compressed layer of a
    `layers`-layer model under `schedule` is due to trim (None: stock, never)."""
    if schedule is None:
        return False
    return any(schedule.decode.trims_after(step, i, layers) for i in range(layers) if schedule.ratios[i] < 1.0)


def _ms(times: list[float]) -> tuple[float | None, float | None]:
    return (1e3 * statistics.fmean(times), 1e3 * max(times)) if times else (None, None)


@torch.inference_mode()
def greedy_run(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    new_tokens: int,
    cache=None,
    schedule: Schedule | None = None,
    tokens_out: list[torch.Tensor] | None = None,
    prefill_rows: int | None = None,
) -> RunStats:
    """Prefill then `new_tokens - 1` single-token decode steps, as `generate` does, each step timed on its own.

    schedule: the schedule the model runs under, to tell trim steps from plain ones (None: all plain).
    tokens_out: if given, each generated [B, 1] token tensor is appended to it (the first comes from prefill).
    prefill_rows: under a schedule, prefill this many rows at a time (`runtime.prefill_rows`).
    """
    device = ids.device
    pos = runtime.mask_positions(mask)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    meter = _PeakRSS() if device.type == "cpu" else None
    clock = _StepClock(device)
    with meter or contextlib.nullcontext():
        _sync(device)
        t0 = time.perf_counter()
        if prefill_rows is not None:
            logits, cache = runtime.prefill_rows(model, ids, mask, rows=prefill_rows, position_ids=pos)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                        logits_to_keep=1)  # fmt: skip
            logits, cache = out.logits, out.cache
            del out
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        kv_prefill = runtime.kv_bytes(cache)
        kv_peak = kv_prefill
        for _ in range(new_tokens - 1):
            if tokens_out is not None:
                tokens_out.append(nxt)
            clock.start()
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            clock.stop()
            kv_peak = max(kv_peak, runtime.kv_bytes(cache))  # between steps: outside the timed windows
        if tokens_out is not None:
            tokens_out.append(nxt)
        _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = meter.peak - meter.base
    times = clock.seconds()
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    trimmed = [is_trim_step(k, schedule, layers) for k in range(1, len(times) + 1)]
    trims = [t for t, trim in zip(times, trimmed, strict=True) if trim]
    plain = [t for t, trim in zip(times, trimmed, strict=True) if not trim]
    plain_mean, plain_max = _ms(plain)
    trim_mean, trim_max = _ms(trims)
    return RunStats(
        prefill_s=prefill_s,
        decode_tokens_per_s=ids.shape[0] * len(times) / max(sum(times), 1e-9),
        kv_bytes_prefill=kv_prefill,
        kv_bytes_end=runtime.kv_bytes(cache),
        cache_bytes_end=runtime.cache_bytes(cache),
        kv_bytes_peak=kv_peak,
        peak_memory_bytes=int(peak),
        prompt_tokens=ids.shape[1],
        decode_steps=len(times),
        plain_step_ms_mean=plain_mean or 0.0,
        plain_step_ms_max=plain_max or 0.0,
        trim_steps=len(trims),
        trim_step_ms_mean=trim_mean,
        trim_step_ms_max=trim_max,
    )


def run_config(
    model,
    name: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    schedule: Schedule | None = None,
    prefill_rows: int | None = None,
) -> RunStats:
    """One greedy run of configuration `name` on these prompts: under `schedule` when given (its prefill
    `prefill_rows` rows at a time, if given), else stock with a `DynamicCache` (`stock_dynamic`) or a `StaticCache`
    sized for the prompt and the fed tokens (the others)."""
    if schedule is not None:
        with runtime.apply(model, schedule):
            return greedy_run(model, ids, mask, steps, schedule=schedule, prefill_rows=prefill_rows)
    if name == "stock_dynamic":
        cache = DynamicCache(config=model.config)
    else:
        # exactly what the run writes (the last token is never fed back), so it holds what DynamicCache does
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps - 1)
    return greedy_run(model, ids, mask, steps, cache)


def median_run(runs: list[RunStats]) -> RunStats:
    """Each figure's median over `runs` (None where a run has none)."""

    def med(name: str):
        vals = [getattr(r, name) for r in runs]
        if any(v is None for v in vals):
            return None
        return type(vals[0])(statistics.median(vals))

    return RunStats(**{name: med(name) for name in asdict(runs[0])})


def precut_tokens(schedule: Schedule, prompt_tokens: int) -> int:
    """Prompt tokens the pre-cut reference keeps: the schedule's mean KV share of the compressible layers (the
    reference holds that many in every layer, sliding-window layers included)."""
    return min(prompt_tokens, max(1, round(schedule.kv_fraction(prompt_tokens) * prompt_tokens)))


def precut_inputs(ids: torch.Tensor, mask: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `precut_tokens` tokens of each (unpadded) prompt, for the pre-cut reference."""
    n = precut_tokens(schedule, ids.shape[1])
    return ids[:, -n:], mask[:, -n:]


def _ratios(ours: RunStats, base: RunStats, largest: dict[str, int], name: str) -> dict[str, float]:
    """schedule / baseline for each figure (decode speed and largest batch: higher is better; the rest lower)."""
    return {
        "prefill_s": ours.prefill_s / max(base.prefill_s, 1e-12),
        "decode_tokens_per_s": ours.decode_tokens_per_s / max(base.decode_tokens_per_s, 1e-12),
        "kv_bytes_prefill": ours.kv_bytes_prefill / max(base.kv_bytes_prefill, 1),
        "kv_bytes_end": ours.kv_bytes_end / max(base.kv_bytes_end, 1),
        "peak_memory_bytes": ours.peak_memory_bytes / max(base.peak_memory_bytes, 1),
        "largest_batch": largest["schedule"] / max(largest[name], 1),
    }


def compare(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    schedule: Schedule,
    new_tokens: int = 64,
    repeats: int = 2,
    kv_limit_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
    other: Schedule | None = None,
    prefill_rows: int | None = None,
) -> dict:
    """Warm, then run every configuration `repeats` times, in turn; medians, ratios against each baseline, batch.

    `ids` are unpadded equal-length prompts (`mask` all ones). `other`: a second schedule in the same run (e.g. a
    per-layer one at the same KV), one more baseline. The result keeps the keys of the older two-way
    comparison (`stock` = stock DynamicCache, `schedule`, `ratios` = schedule / stock DynamicCache) and adds
    `configs`, `labels`, `ratios_vs` and `decode_speed`. `prefill_rows`: the schedules prefill this many rows at
    a time (`runtime.prefill_rows`).
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (a prefill token and a decode step), got {new_tokens}")
    cut_ids, cut_mask = precut_inputs(ids, mask, schedule)
    interval = schedule.decode.interval

    schedules = {"schedule": schedule, **({"other": other} if other is not None else {})}
    configs = (*CONFIGS, *(["other"] if other is not None else []))
    against = {name: label for name, label in AGAINST.items() if name in configs}

    def run(name: str, steps: int) -> RunStats:
        x, m = (cut_ids, cut_mask) if name == "precut" else (ids, mask)
        return run_config(model, name, x, m, steps, schedules.get(name), prefill_rows)

    # warm-up, untimed: first calls pay for lazy init and the allocator learns the shapes; the schedule runs
    # through its first trim when the timed runs will have one
    for name in configs:
        if progress:
            progress(f"warm-up: {LABELS[name]}")
        run(name, warm_steps(schedules.get(name), new_tokens))
    runs: dict[str, list[RunStats]] = {name: [] for name in configs}
    for i in range(repeats):
        # the order reverses every other repeat: a run inherits the allocator state the previous one left (a
        # DynamicCache decode frees and re-allocates the whole cache every token), which can slow the next prefill
        for name in configs if i % 2 == 0 else configs[::-1]:
            if progress:
                progress(f"repeat {i + 1}/{repeats}: {LABELS[name]}")
            runs[name].append(run(name, new_tokens))
    med = {name: median_run(r) for name, r in runs.items()}
    batch = ids.shape[0]
    limit = kv_limit_bytes or med["stock_dynamic"].kv_bytes_peak
    largest = {name: int(limit // max(r.kv_bytes_peak / batch, 1)) for name, r in med.items()}
    ratios_vs = {name: _ratios(med["schedule"], med[name], largest, name) for name in against}
    return {
        "batch": batch,
        "prompt_tokens": ids.shape[1],
        "precut_tokens": cut_ids.shape[1],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "trim_interval": interval,
        "stagger": schedule.decode.stagger,
        "prefill_rows": prefill_rows,
        "kv_limit_bytes": limit,
        "stock": asdict(med["stock_dynamic"]),  # older key: stock = stock DynamicCache
        "schedule": asdict(med["schedule"]),
        "configs": {name: asdict(r) for name, r in med.items()},
        "labels": {name: LABELS[name] for name in configs},
        "against": against,
        "largest_batch": {"stock": largest["stock_dynamic"], **largest},
        "ratios": ratios_vs["stock_dynamic"],  # older key: schedule / stock DynamicCache
        "ratios_vs": ratios_vs,
        "decode_speed": {label: ratios_vs[name]["decode_tokens_per_s"] for name, label in against.items()},
        "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
    }


class ThroughputInputError(ValueError):
    """What the caller of `throughput_at_largest` can change: a KV limit that fits no row, too few prompts."""


THROUGHPUT_CONFIGS = ("stock_static", "schedule")  # the honest baseline and the schedule, each at its largest batch


def generation_tokens_per_s(r: RunStats, new_tokens: int, rows: int) -> float:
    """Tokens generated per second over the whole request: prefill and every decode step."""
    decode_s = rows * r.decode_steps / max(r.decode_tokens_per_s, 1e-12)
    return rows * new_tokens / max(r.prefill_s + decode_s, 1e-12)


def throughput_at_largest(
    model,
    prompts: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule,
    rows: dict[str, int],
    new_tokens: int = 64,
    repeats: int = 1,
    progress: Callable[[str], None] | None = None,
    prefill_rows: int | None = None,
) -> dict:
    """Stock `StaticCache` and the schedule, each run at its own largest batch (`rows`, e.g. `compare`'s
    `largest_batch`: what fits the same KV limit), warmed there once, then in turn, the order reversing every other
    repeat: decode tokens/s and generation tokens/s (prefill included) there, medians over `repeats`, and the
    schedule's ratio to stock. `prompts(n)` gives `n` unpadded prompts and their mask. This is the paper's
    throughput metric: what a server with that much memory for KV serves per second. `prefill_rows`: the schedule
    prefills this many rows at a time (`runtime.prefill_rows`; e.g. stock's batch, so that it never holds more
    full-length KV than stock does).

    Raises `ThroughputInputError` for what the caller can change (a limit that fits no row, too few prompts)
    before any model runs."""
    for name in THROUGHPUT_CONFIGS:
        if rows.get(name, 0) < 1:
            raise ThroughputInputError(
                f"{LABELS[name]} fits no row in the KV limit; raise the limit (bench --kv-limit-mb)"
            )
    inputs = {}
    for name in THROUGHPUT_CONFIGS:
        ids, mask = prompts(rows[name])
        if ids.shape[0] != rows[name]:
            raise ThroughputInputError(
                f"the prompts hold {ids.shape[0]} rows, not the {rows[name]} of {LABELS[name]}'s largest batch; "
                "give more text (bench --data) or shorter prompts (--context)"
            )
        inputs[name] = ids, mask
    runs: dict[str, list[RunStats]] = {name: [] for name in THROUGHPUT_CONFIGS}

    def run(name: str, steps: int) -> RunStats:
        if name == "schedule":
            return run_config(model, name, *inputs[name], steps, schedule, prefill_rows)
        return run_config(model, name, *inputs[name], steps)

    for name in THROUGHPUT_CONFIGS:  # untimed, at this batch: the allocator's first growth to the new shapes
        if progress:
            progress(f"throughput warm-up: {LABELS[name]} at batch {rows[name]}")
        run(name, warm_steps(schedule if name == "schedule" else None, new_tokens))
    for i in range(repeats):
        for name in THROUGHPUT_CONFIGS if i % 2 == 0 else THROUGHPUT_CONFIGS[::-1]:
            if progress:
                progress(f"throughput {i + 1}/{repeats}: {LABELS[name]} at batch {rows[name]}")
            runs[name].append(run(name, new_tokens))
    med = {name: median_run(r) for name, r in runs.items()}
    decode = {name: r.decode_tokens_per_s for name, r in med.items()}
    generation = {name: generation_tokens_per_s(r, new_tokens, rows[name]) for name, r in med.items()}
    return {
        "rows": {name: rows[name] for name in THROUGHPUT_CONFIGS},
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_rows": prefill_rows,
        "configs": {name: asdict(r) for name, r in med.items()},
        "decode_tokens_per_s": decode,
        "generation_tokens_per_s": generation,
        "decode_ratio": decode["schedule"] / max(decode["stock_static"], 1e-12),
        "generation_ratio": generation["schedule"] / max(generation["stock_static"], 1e-12),
    }


def format_throughput(t: dict) -> str:
    """The throughput part: stock StaticCache and the schedule at their largest batches, and the ratio."""
    names = THROUGHPUT_CONFIGS
    mb = 1 / 2**20
    rows = t["rows"]
    lines = [
        "| at the largest batch | " + " | ".join(LABELS[n] for n in names) + " | schedule / stock |",
        "|---|---|---|---|",
        f"| batch | {rows['stock_static']} | {rows['schedule']} | {rows['schedule'] / rows['stock_static']:.2f}x |",
    ]
    for label, key in (("decode tokens/s", "decode_tokens_per_s"), ("generation tokens/s (prefill included)",
                                                                    "generation_tokens_per_s")):  # fmt: skip
        ratio = t[key]["schedule"] / max(t[key]["stock_static"], 1e-12)
        lines.append(f"| {label} | " + " | ".join(f"{t[key][n]:.1f}" for n in names) + f" | {ratio:.2f}x |")
    for label, key in (("KV MiB at end", "kv_bytes_end"), ("peak memory MiB (above start)", "peak_memory_bytes")):
        a, b = (t["configs"][n][key] for n in names)
        lines.append(f"| {label} | {a * mb:.0f} | {b * mb:.0f} | {b / max(a, 1):.2f}x |")
    return "\n".join(lines)


def _cell(value: float | None, fmt: str, scale: float | None = None) -> str:
    if value is None:
        return "-"
    return format(value if scale is None else value * scale, fmt)


def format_table(result: dict) -> str:
    """Every configuration side by side, then the schedule's ratio against each baseline."""
    configs, largest, labels, against = result["configs"], result["largest_batch"], result["labels"], result["against"]
    names = list(labels)
    mb = 1 / 2**20
    rows = [
        ("prompt tokens per row", "prompt_tokens", None, "d"),
        ("prefill seconds", "prefill_s", None, ".3f"),
        ("decode tokens/s", "decode_tokens_per_s", None, ".1f"),
        ("plain step ms, mean", "plain_step_ms_mean", None, ".2f"),
        ("plain step ms, max", "plain_step_ms_max", None, ".2f"),
        ("trim steps", "trim_steps", None, "d"),
        ("trim step ms, mean", "trim_step_ms_mean", None, ".2f"),
        ("trim step ms, max", "trim_step_ms_max", None, ".2f"),
        ("KV MiB after prefill", "kv_bytes_prefill", mb, ".2f"),
        ("KV MiB at end", "kv_bytes_end", mb, ".2f"),
        ("peak memory MiB (above start)", "peak_memory_bytes", mb, ".0f"),
    ]
    lines = ["| metric | " + " | ".join(labels[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, scale, fmt in rows:
        cells = [_cell(configs[n][key], fmt, scale) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    limit = f"largest batch in {result['kv_limit_bytes'] * mb:.4g} MiB KV"
    lines.append(f"| {limit} | " + " | ".join(str(largest[n]) for n in names) + " |")
    ratio_rows = [
        ("decode tokens/s", "decode_tokens_per_s"),
        ("prefill seconds", "prefill_s"),
        ("KV bytes after prefill", "kv_bytes_prefill"),
        ("KV bytes at end", "kv_bytes_end"),
        ("peak memory", "peak_memory_bytes"),
        ("largest batch", "largest_batch"),
    ]
    vs = result["ratios_vs"]
    lines += ["", "| schedule / baseline | " + " | ".join(against.values()) + " |", "|---" * (len(against) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(f"{vs[n][key]:.2f}x" for n in against) + " |" for label, key in ratio_rows]
    lines += [
        "",
        f"pre-cut reference: stock attention on the last {result['precut_tokens']} of {result['prompt_tokens']} "
        f"prompt tokens; trim steps: every {result['trim_interval']} tokens after prefill"
        + (", staggered over the layers (a step where any layer trims)" if result.get("stagger") else ""),
    ]
    if "throughput" in result:
        lines += ["", format_throughput(result["throughput"])]
    return "\n".join(lines)
