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


def _pid_of(unit: int) -> torch.Tensor:
    return torch.tensor([unit, os.getpid()], dtype=torch.float64)


def test_workers_measure_every_unit_once_in_other_processes():
    got: dict[int, torch.Tensor] = {}

    def finished(unit, values):
        assert unit not in got
        got[unit] = values

    unit_pool.run(range(7), _pid_of, finished, workers=2)
    assert sorted(got) == list(range(7))
    assert all(float(v[0]) == u for u, v in got.items())
    pids = {int(v[1]) for v in got.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(v.dtype == torch.float64 for v in got.values())  # the measured dtype comes back
    one: dict[int, torch.Tensor] = {}
    unit_pool.run(range(3), _pid_of, lambda u, v: one.__setitem__(u, v), workers=1)
    assert {int(v[1]) for v in one.values()} == {os.getpid()}  # 1: measured here


def test_a_workers_error_names_the_unit_and_the_error():
    def measure(unit):
        if unit == 3:
            raise ValueError("no room")
        return torch.zeros(2)

    with pytest.raises(CalibrateError, match=r"failed on unit 3: ValueError: no room"):
        unit_pool.run(range(6), measure, lambda u, v: None, workers=2)


def test_a_worker_that_dies_is_reported():
    def measure(unit):
        if unit == 2:
            os._exit(3)  # as the kernel's out-of-memory killer would end it, without a word
        return torch.zeros(2)

    with pytest.raises(CalibrateError, match=r"exited with code 3 .*--profile-workers 1"):
        unit_pool.run(range(6), measure, lambda u, v: None, workers=2)


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


def test_the_worker_count_is_checked():
    with pytest.raises(CalibrateError, match=r"--profile-workers 0: give at least 1"):
        unit_pool.workers_for(0, "cpu", None)
    with pytest.raises(CalibrateError, match=r"--profile-workers 2: .* not with --device cuda; leave"):
        unit_pool.workers_for(2, "cuda", None)
    with pytest.raises(CalibrateError, match=r"not with --device-map auto"):
        unit_pool.workers_for(2, "cpu", "auto")
    assert unit_pool.workers_for(None, "cuda", None) == unit_pool.workers_for(1, "cuda", None) == 1
    assert 1 <= unit_pool.workers_for(None, "cpu", None) <= unit_pool.MAX_AUTO_WORKERS
    assert unit_pool.workers_for(3, "cpu", None) == 3
