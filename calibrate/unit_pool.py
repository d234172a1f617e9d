"""Independent measurements spread over forked worker processes, for a profile on the CPU.

A sensitivity curve is a few small forwards (SmolLM2: 576-wide matrices, a few hundred tokens), which one torch
process spreads over its threads poorly: on 2 cores one thread takes 1.67x the time of two. Processes that each
measure whole curves on one thread each share nothing and waste nothing. The workers are forked after the full-cache
prefill, so they read the model and the prefilled caches that the parent already holds (copy on write) instead
of loading and prefilling again; each sends back only the small curve tensors. CUDA cannot be forked into, so a
GPU profile stays in one process (`workers_for`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .errors import CalibrateError

Unit = TypeVar("Unit")
MAX_AUTO_WORKERS = 8  # the most workers "auto" starts: each holds its own activations and written cache pages


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def workers_for(requested: int | None, device: str, device_map: str | None, threads: int | None = None) -> int:
    """How many processes measure the curves, each on one torch thread: `requested` (at most `threads`, default
    torch's: `--threads`), or None for auto: on Linux on the CPU one per thread, up to MAX_AUTO_WORKERS; 1 whenever
    the model is on a GPU or spread by a device map, or where this platform cannot fork."""
    threads = threads or torch.get_num_threads()
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
        if requested > threads:
            raise CalibrateError(
                f"--profile-workers {requested}: more workers than the {threads} torch threads (--threads), one "
                f"each; give at most {threads}, or raise --threads"
            )
        return requested
    if not sys.platform.startswith("linux"):  # macOS lists fork, but its system libraries are not fork-safe
        return 1
    return max(1, min(threads, cores(), MAX_AUTO_WORKERS))


def run(
    units: Sequence[Unit],
    measure: Callable[[Unit], torch.Tensor],
    finished: Callable[[Unit, torch.Tensor], None],
    workers: int = 1,
) -> None:
    """`finished(unit, measure(unit))` for every unit, in this process (`workers` 1) or, measured by `workers`
    forked processes of one torch thread each, here in the order they finish. A worker's
    CalibrateError is raised here as it is, any other error as a RuntimeError carrying the worker's traceback;
    Ctrl-C stops the workers (what `finished` saw is kept)."""
    units = list(units)
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            finished(unit, measure(unit))
        return
    workers = min(workers, len(units))
    ctx = multiprocessing.get_context("fork")
    todo, results = ctx.Queue(), ctx.Queue()
    args = (units, measure, os.getpid(), todo, results)
    procs = [ctx.Process(target=_work, args=args, daemon=True) for _ in range(workers)]
    try:
        _start(procs)
        for i in range(len(units)):
            todo.put(i)
        for _ in range(workers):
            todo.put(None)
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
                kind, text = error
                if kind == "CalibrateError":
                    raise CalibrateError(text)
                raise RuntimeError(f"a profile worker failed on unit {units[i]!r}:\n{text}")
            finished(units[i], torch.tensor(values, dtype=dtype))
            left -= 1
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join()
        todo.cancel_join_thread()  # what no worker took stays unread: exiting must not wait to flush it
        todo.close()
        results.close()


def _start(procs) -> None:
    """Fork the workers with Ctrl-C held back: they inherit SIGINT blocked (it is this process's to handle: it
    stops them), and here a Ctrl-C while forking is raised once every worker has started, since one raised inside
    `start` (an at-fork hook) would be printed and lost, or leave a worker this process does not know of."""
    pressed: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:  # not the main thread, where Python runs its signal handlers: nothing to hold back
        previous = None
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    # tokenizers warns in every forked child when its thread pool was used; the children never tokenize
    tokenizers = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        for p in procs:
            p.start()
    finally:
        if tokenizers is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = tokenizers
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def _end_with_parent() -> None:
    """Linux: this worker gets SIGTERM when the process that forked it dies (killed, out of memory)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent check in `_work` remains
        pass


def _work(units, measure, parent: int, todo, results) -> None:
    """A worker: measure the units whose indices it takes from `todo` until it takes None (or its parent is
    gone)."""
    _end_with_parent()
    # one thread: the OpenMP pool of the parent's torch threads does not survive a fork, and a worker that runs
    # torch on 2 threads hangs in its first parallel region
    torch.set_num_threads(1)
    with torch.inference_mode():
        while os.getppid() == parent and (i := todo.get()) is not None:
            try:
                values = measure(units[i])
            except Exception as e:  # sent to the parent, which raises it
                results.put((i, None, None, (type(e).__name__, str(e) if isinstance(e, CalibrateError)
                                             else traceback.format_exc())))  # fmt: skip
                return
            # plain numbers: torch's own pickling of tensors would pass shared-memory handles between processes
            results.put((i, values.tolist(), values.dtype, None))
