"""Side-by-side speed and memory of the stock model and a schedule, measured in one run.

Machines are noisy, so stock and schedule runs alternate and each figure is the median over repeats; only the
ratios are meant to be compared, and only within one run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import DynamicCache

import runtime
from runtime.schedule import Schedule


@dataclass
class RunStats:
    prefill_s: float
    decode_tokens_per_s: float
    kv_bytes_prefill: int
    kv_bytes_end: int
    kv_bytes_peak: int
    peak_memory_bytes: int  # process memory above what it held before the run (CUDA: allocator peak)


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


@torch.inference_mode()
def greedy_run(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, cache=None) -> RunStats:
    """Prefill then `new_tokens - 1` single-token decode steps, as `generate` does, timed separately."""
    device = ids.device
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    meter = _PeakRSS() if device.type == "cpu" else None
    with meter or _nullcontext():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        kv_prefill = runtime.kv_bytes(cache)
        kv_peak = kv_prefill
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            kv_peak = max(kv_peak, runtime.kv_bytes(cache))
        _sync(device)
        t2 = time.perf_counter()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = meter.peak - meter.base
    steps = max(new_tokens - 1, 1)
    return RunStats(
        prefill_s=t1 - t0,
        decode_tokens_per_s=ids.shape[0] * steps / max(t2 - t1, 1e-9),
        kv_bytes_prefill=kv_prefill,
        kv_bytes_end=runtime.kv_bytes(cache),
        kv_bytes_peak=kv_peak,
        peak_memory_bytes=int(peak),
    )


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _median(runs: list[RunStats]) -> RunStats:
    fields = asdict(runs[0]).keys()
    return RunStats(**{f: type(getattr(runs[0], f))(statistics.median(getattr(r, f) for r in runs)) for f in fields})


def compare(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    schedule: Schedule,
    new_tokens: int = 64,
    repeats: int = 2,
    kv_limit_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run stock and schedule `repeats` times each, alternating which goes first; medians, ratios, largest batch."""
    stock_runs, ours_runs = [], []
    greedy_run(model, ids[:1, -64:], mask[:1, -64:], 2)  # warm-up: first calls pay for lazy init

    def stock() -> None:
        if progress:
            progress(f"repeat {i + 1}/{repeats}: stock")
        stock_runs.append(greedy_run(model, ids, mask, new_tokens, DynamicCache(config=model.config)))

    def ours() -> None:
        if progress:
            progress(f"repeat {i + 1}/{repeats}: schedule")
        with runtime.apply(model, schedule):
            ours_runs.append(greedy_run(model, ids, mask, new_tokens))

    for i in range(repeats):
        # which one goes first alternates: a run inherits the allocator state the previous one left (a stock
        # decode frees and re-allocates the whole cache every token), and that measurably slows the next prefill
        for run in (stock, ours) if i % 2 == 0 else (ours, stock):
            run()
    stock, ours = _median(stock_runs), _median(ours_runs)
    batch = ids.shape[0]
    limit = kv_limit_bytes or stock.kv_bytes_peak
    largest = {
        name: int(limit // max(r.kv_bytes_peak / batch, 1)) for name, r in (("stock", stock), ("schedule", ours))
    }
    ratios = {
        "prefill_s": ours.prefill_s / stock.prefill_s,
        "decode_tokens_per_s": ours.decode_tokens_per_s / stock.decode_tokens_per_s,
        "kv_bytes_prefill": ours.kv_bytes_prefill / stock.kv_bytes_prefill,
        "kv_bytes_end": ours.kv_bytes_end / stock.kv_bytes_end,
        "peak_memory_bytes": ours.peak_memory_bytes / max(stock.peak_memory_bytes, 1),
        "largest_batch": largest["schedule"] / max(largest["stock"], 1),
    }
    return {
        "batch": batch,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "kv_limit_bytes": limit,
        "stock": asdict(stock),
        "schedule": asdict(ours),
        "largest_batch": largest,
        "ratios": ratios,
        "runs": {"stock": [asdict(r) for r in stock_runs], "schedule": [asdict(r) for r in ours_runs]},
    }


def format_table(result: dict) -> str:
    s, o, r = result["stock"], result["schedule"], result["ratios"]
    mb = 1 / 2**20
    rows = [
        ("prefill seconds", f"{s['prefill_s']:.2f}", f"{o['prefill_s']:.2f}", r["prefill_s"]),
        (
            "decode tokens/s",
            f"{s['decode_tokens_per_s']:.1f}",
            f"{o['decode_tokens_per_s']:.1f}",
            r["decode_tokens_per_s"],
        ),
        (
            "KV MiB after prefill",
            f"{s['kv_bytes_prefill'] * mb:.1f}",
            f"{o['kv_bytes_prefill'] * mb:.1f}",
            r["kv_bytes_prefill"],
        ),
        ("KV MiB at end", f"{s['kv_bytes_end'] * mb:.1f}", f"{o['kv_bytes_end'] * mb:.1f}", r["kv_bytes_end"]),
        (
            "peak memory MiB (above start)",
            f"{s['peak_memory_bytes'] * mb:.0f}",
            f"{o['peak_memory_bytes'] * mb:.0f}",
            r["peak_memory_bytes"],
        ),
        (
            f"largest batch in {result['kv_limit_bytes'] * mb:.0f} MiB KV",
            str(result["largest_batch"]["stock"]),
            str(result["largest_batch"]["schedule"]),
            r["largest_batch"],
        ),
    ]
    lines = ["| metric | stock | schedule | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d:.2f}x |" for a, b, c, d in rows]
    return "\n".join(lines)
