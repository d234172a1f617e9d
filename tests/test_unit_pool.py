"""`calibrate.unit_pool`: sensitivity curves measured by forked worker processes are the curves one process
measures; a worker's failure or death is a one-line error naming it; the option is checked before any work."""

from __future__ import annotations

import os

import pytest
import torch
from test_scoring import examples
from tiny_models import tiny_model

import runtime
from calibrate import unit_pool
from calibrate.errors import CalibrateError
from calibrate.profiling import GRID, single_layer_kl
from calibrate.scoring import Evaluator
from runtime.schedule import Schedule


def test_workers_measure_every_unit_once_in_other_processes():
    import multiprocessing

    # the first two units meet at a barrier: two workers, each holding one of them, must run at once
    barrier = multiprocessing.get_context("fork").Barrier(2)

    def measure(unit: int) -> torch.Tensor:
        if unit < 2:
            barrier.wait(timeout=60)
        return torch.tensor([unit, os.getpid()], dtype=torch.float64)

    got: dict[int, torch.Tensor] = {}

    def finished(unit, values):
        assert unit not in got
        got[unit] = values

    unit_pool.run(range(7), measure, finished, workers=2)
    assert sorted(got) == list(range(7))
    assert all(float(v[0]) == u for u, v in got.items())
    pids = {int(v[1]) for v in got.values()}
    assert os.getpid() not in pids and len(pids) == 2
    assert all(v.dtype == torch.float64 for v in got.values())  # the measured dtype comes back
    one: dict[int, torch.Tensor] = {}
    unit_pool.run([5, 6], lambda u: torch.tensor([u, os.getpid()]), lambda u, v: one.__setitem__(u, v), workers=1)
    assert {int(v[1]) for v in one.values()} == {os.getpid()}  # 1: measured here


def test_workers_run_on_one_thread_after_the_parent_used_its_thread_pool():
    """torch's OpenMP pool does not survive a fork: a worker on 2 threads hangs, so every worker runs on one (in a
    subprocess, so that a hang fails this test instead of stopping the suite)."""
    import subprocess
    import sys

    script = """
import torch
from calibrate import unit_pool
torch.set_num_threads(4)
a = torch.randn(512, 512)
for _ in range(5):
    a @ a  # the parent's pool of threads runs
def measure(unit):
    x = torch.randn(512, 512)
    return torch.tensor([float((x @ x).isfinite().all()), torch.get_num_threads()])
got = {}
unit_pool.run(range(4), measure, got.__setitem__, workers=2)
print(sorted((u, v.tolist()) for u, v in got.items()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str([(u, [1.0, 1.0]) for u in range(4)])


def test_a_workers_error_comes_back_with_its_traceback():
    def measure(unit):
        if unit == 3:
            {"a": {}}["a"]["b"]  # a bug: KeyError
        if unit == 4:
            raise CalibrateError("--context-length 9: too short")
        return torch.zeros(2)

    with pytest.raises(RuntimeError, match=r"(?s)failed on unit 3:.*Traceback.*in measure.*KeyError: 'b'"):
        unit_pool.run(range(4), measure, lambda u, v: None, workers=2)
    with pytest.raises(CalibrateError, match=r"^--context-length 9: too short$"):  # a user's error, as it is
        unit_pool.run([4, 5], measure, lambda u, v: None, workers=2)


def test_a_worker_that_dies_is_reported():
    def measure(unit):
        if unit == 2:
            os._exit(3)  # as the kernel's out-of-memory killer would end it, without a word
        return torch.zeros(2)

    with pytest.raises(CalibrateError, match=r"exited with code 3 .*--profile-workers 1"):
        unit_pool.run(range(6), measure, lambda u, v: None, workers=2)


def test_workers_end_with_a_killed_parent(tmp_path):
    """The parent killed (out of memory, a timeout): its workers stop too instead of measuring on alone."""
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = f"""
import os, time, torch
from calibrate import unit_pool
def measure(unit):
    with open({str(pids)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(60)
    return torch.zeros(1)
unit_pool.run(range(4), measure, lambda u, v: None, workers=2)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.1)
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_ctrl_c_while_the_workers_start_is_raised_here_after_they_started(monkeypatch):
    """Ctrl-C that arrives while forking is held back, then raised once every worker is started: and so stopped."""
    import multiprocessing
    import signal

    started = []
    real_start = multiprocessing.context.ForkProcess.start

    def start(self):
        real_start(self)
        started.append(self)
        if len(started) == 1:
            signal.raise_signal(signal.SIGINT)  # between the two forks

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", start)
    with pytest.raises(KeyboardInterrupt):
        unit_pool.run(range(4), lambda u: torch.zeros(1), lambda u, v: None, workers=2)
    assert len(started) == 2 and all(p.exitcode is not None for p in started)  # both started, both ended
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is handled as before


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_curves_measured_by_workers_equal_one_process(family):
    model = tiny_model(family, kv_heads=2)
    ev = Evaluator(model, examples(), query_window=16, sinks=2, batch_size=2)
    base = Schedule(ratios=[1.0] * ev.layers, window=8, sinks=2)
    compressible = [c for c, _ in runtime.families.layer_plan(model)]
    for heads in (None, 2):
        one = single_layer_kl([ev], base, compressible, GRID, heads=heads)
        two = single_layer_kl([ev], base, compressible, GRID, heads=heads, workers=2)
        assert (one > 0).sum() >= 4  # really compressed
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-9)


def test_the_worker_count_is_checked(monkeypatch):
    with pytest.raises(CalibrateError, match=r"--profile-workers 0: give at least 1"):
        unit_pool.workers_for(0, "cpu", None)
    with pytest.raises(CalibrateError, match=r"--profile-workers 2: .* not with --device cuda; leave"):
        unit_pool.workers_for(2, "cuda", None)
    with pytest.raises(CalibrateError, match=r"not with --device-map auto"):
        unit_pool.workers_for(2, "cpu", "auto")
    with pytest.raises(CalibrateError, match=r"--profile-workers 3: more workers than the 2 torch threads"):
        unit_pool.workers_for(3, "cpu", None, threads=2)
    assert unit_pool.workers_for(None, "cuda", None) == unit_pool.workers_for(1, "cuda", None) == 1
    assert unit_pool.workers_for(3, "cpu", None, threads=3) == 3
    # auto: one per thread (--threads), within the cores and MAX_AUTO_WORKERS, on Linux only
    monkeypatch.setattr(unit_pool, "cores", lambda: 16)
    assert unit_pool.workers_for(None, "cpu", None, threads=1) == 1
    assert unit_pool.workers_for(None, "cpu", None, threads=3) == 3
    assert unit_pool.workers_for(None, "cpu", None, threads=16) == unit_pool.MAX_AUTO_WORKERS
    monkeypatch.setattr(unit_pool.sys, "platform", "darwin")
    assert unit_pool.workers_for(None, "cpu", None, threads=4) == 1
