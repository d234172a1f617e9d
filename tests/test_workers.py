"""Several workers on one Optuna study in a real PostgreSQL server; one is killed mid-trial.

`.ci/postgres.sh` (run by `make test`) starts the server and exports PYRAMIDINFER_TEST_PG.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

import runtime

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

PG = os.environ.get("PYRAMIDINFER_TEST_PG")


def _states(storage, name):
    return [t.state for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)]


@pytest.mark.skipif(not PG, reason="PYRAMIDINFER_TEST_PG is unset: run the suite with `make test` (starts PostgreSQL)")
def test_three_workers_one_killed_reach_the_trial_budget(tiny_model_dir, shared_data, tmp_path):
    name = f"workers-{uuid.uuid4().hex[:8]}"
    text = shared_data / "tinyshakespeare" / "input.txt"
    out = tmp_path / "w.json"
    env = {**os.environ, "PYRAMIDINFER_HEARTBEAT": "2"}
    common = ["--storage", PG, "--study-name", name]
    budget = 40
    first = [
        *("run --model", str(tiny_model_dir), "--data", str(text)),
        *("--quick --context-length 128 --trials", str(budget), "--out", str(out)),
    ]
    first = " ".join(first).split() + common
    procs = [subprocess.Popen([sys.executable, "-m", "calibrate", *first], env=env, start_new_session=True)]
    storage = optuna.storages.RDBStorage(PG)
    deadline = time.time() + 300
    while time.time() < deadline:  # workers join once the study (settings, profile) exists
        if name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            summary = next(s for s in optuna.get_all_study_summaries(storage) if s.study_name == name)
            if "profile" in summary.user_attrs:
                break
        time.sleep(0.5)
    worker = [sys.executable, "-m", "calibrate", "worker", *common]
    procs += [subprocess.Popen(worker, env=env, start_new_session=True) for _ in range(2)]
    victim = procs[2]
    # kill one worker while it holds a running trial
    while time.time() < deadline:
        study = optuna.load_study(study_name=name, storage=storage)
        running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
        if any(t.user_attrs.get("worker", "").endswith(f":{victim.pid}") for t in running):
            os.killpg(victim.pid, signal.SIGKILL)  # the victim holds a running trial
            break
        time.sleep(0.2)
    for p in procs[:2]:
        assert p.wait(timeout=600) == 0
    victim.wait()
    # a worker joining after the dead one's heartbeat expired (2 beats) fails its trial and re-queues it
    time.sleep(5)
    subprocess.run(worker, env=env, check=True, timeout=300)
    states = _states(storage, name)
    assert optuna.trial.TrialState.RUNNING not in states, states
    done = states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED)
    assert done >= budget, states
    # the killed trial was marked failed and its parameters re-queued, not lost
    study = optuna.load_study(study_name=name, storage=storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    retried = [t for t in study.trials if "failed_trial" in t.system_attrs]
    assert len(failed) >= 1 and len(retried) >= 1
    # no duplicated baselines: each enqueued reference shape ran once with the default selection
    firsts = [t.params.get("shape") for t in study.trials[:4]]
    assert sorted(firsts) == sorted(["uniform", "pyramidkv", "pyramidinfer", "sensitivity"])
    # export from the storage alone, then load it in the runtime
    export = tmp_path / "exported.json"
    subprocess.run([sys.executable, "-m", "calibrate", "export", *common, "--out", str(export)], check=True, env=env)
    schedule = runtime.load_schedule(export)
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    assert schedule.provenance["trials"] == complete and schedule.model.num_layers == 4
