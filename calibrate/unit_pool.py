"""Independent measurements spread over forked worker processes, for a profile on the CPU.

A sensitivity curve is a few small forwards (SmolLM2: 576-wide matrices, a few hundred tokens), which one torch
process spreads over its threads poorly: on 2 cores one thread takes 1.67x the time of two. Processes that each
measure whole curves on one thread share nothing and waste nothing. The workers are forked after the full-cache
prefill, so they read the model and the prefilled caches that the parent already holds (copy on write) instead
of loading and prefilling again; each sends back only the small curve tensors. CUDA cannot be forked into, so a
GPU profile stays in one process (`workers_for`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .errors import CalibrateError

Unit = TypeVar("Unit")
MAX_AUTO_WORKERS = 4  # the most workers "auto" starts: each holds its own activations and written cache pages


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def workers_for(requested: int | None, device: str, device_map: str | None) -> int:
    """How many processes measure the curves: `requested` (None: auto, one per core up to MAX_AUTO_WORKERS, on
    the CPU), 1 whenever the model is on a GPU or spread by a device map, or where this platform cannot fork."""
    if requested is not None and requested < 1:
        raise CalibrateError(f"--profile-workers {requested}: give at least 1 (1 measures in this process)")
    on_cpu = device == "cpu" and device_map is None
    if not on_cpu or "fork" not in multiprocessing.get_all_start_methods():
        if requested is not None and requested > 1:
            where = f"--device {device}" if device_map is None else f"--device-map {device_map}"
            raise CalibrateError(
                f"--profile-workers {requested}: worker processes measure on the CPU only, not with {where}; "
                "leave --profile-workers out"
            )
        return 1
    if requested is not None:
        return requested
    return max(1, min(cores(), MAX_AUTO_WORKERS))


def run(
    units: Sequence[Unit],
    measure: Callable[[Unit], torch.Tensor],
    finished: Callable[[Unit, torch.Tensor], None],
    workers: int = 1,
) -> None:
    """`finished(unit, measure(unit))` for every unit, in this process (`workers` 1) or, measured by `workers`
    forked processes of cores/workers torch threads each, here in the order they finish. A worker's error is
    raised here with its traceback's last line; Ctrl-C stops the workers (what `finished` saw is kept)."""
    units = list(units)
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            finished(unit, measure(unit))
        return
    workers = min(workers, len(units))
    threads = max(1, torch.get_num_threads() // workers)
    ctx = multiprocessing.get_context("fork")
    todo, results = ctx.Queue(), ctx.Queue()
    for i in range(len(units)):
        todo.put(i)
    for _ in range(workers):
        todo.put(None)
    # tokenizers warns in every forked child when its thread pool was used; the children never tokenize
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = (units, measure, threads, todo, results)
    procs = [ctx.Process(target=_work, args=args, daemon=True) for _ in range(workers)]
    # Ctrl-C is this process's to handle (it stops the workers): the workers start, and stay, with SIGINT blocked;
    # here it is blocked while forking too, since a KeyboardInterrupt raised in an at-fork hook is only printed
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        left = len(units)
        while left:
            try:
                i, values, dtype, error = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise CalibrateError(
                        f"a profile worker exited with code {dead[0].exitcode} (out of memory?); run again to "
                        "resume from the curves finished, or with --profile-workers 1"
                    ) from None
                if all(p.exitcode == 0 for p in procs) and results.empty():
                    raise CalibrateError(f"the profile workers ended with {left} curves unmeasured") from None
                continue
            if error is not None:
                raise CalibrateError(f"a profile worker failed on unit {units[i]!r}: {error}")
            finished(units[i], torch.tensor(values, dtype=dtype))
            left -= 1
    finally:
        started = [p for p in procs if p.pid is not None]  # a failed fork leaves the rest unstarted
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join()
        todo.cancel_join_thread()  # what no worker took stays unread: exiting must not wait to flush it
        todo.close()
        results.close()


def _work(units, measure, threads: int, todo, results) -> None:
    """A worker: measure the units whose indices it takes from `todo` until it takes None."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        while (i := todo.get()) is not None:
            try:
                values = measure(units[i])
            except Exception as e:  # sent to the parent, which raises it
                where = traceback.format_exc().splitlines()[-3].strip()
                results.put((i, None, None, f"{type(e).__name__}: {e} ({where})"))
                return
            # plain numbers: torch's own pickling of tensors would pass shared-memory handles between processes
            results.put((i, values.tolist(), values.dtype, None))
