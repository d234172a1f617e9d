"""Bad input and interruptions on the command line: one line, the user's own argument, nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_calibrate import _args, _trials, _trials_so_far

import runtime
from calibrate.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture
def text(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare" / "input.txt"


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("calibrate: error: "), err
    return err[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("command", ["export", "worker"])
def test_reading_a_study_never_creates_a_database(command, tmp_path, capsys):
    db = tmp_path / "typo.optuna.db"
    msg = one_line_error([command, "--storage", f"sqlite:///{db}", "--study-name", "s"], capsys)
    assert f"--storage 'sqlite:///{db}': no database at" in msg and "calibrate run" in msg
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trials", "0"], "--trials 0: a study needs at least 1 trial"),
        (["--budget", "1.5"], "budget 1.5 is outside (0, 1]"),
        (["--storage", "notaurl"], "--storage 'notaurl' is not a database URL"),
        (["--calib-windows", "0"], "--calib-windows must be at least 1"),
        (["--profile-continuation", "64"], "--profile-continuation 64: must be 2 to 63"),
        (["--profile-continuation", "1"], "--profile-continuation 1: must be 2 to 63"),
        (["--profile-workers", "0"], "--profile-workers 0: give at least 1"),
        (["--profile-workers", "2", "--device", "cuda"], "--profile-workers 2: worker processes measure on the CPU"),
    ],
)
def test_a_run_that_fails_on_its_inputs_creates_nothing(tiny_model_dir, text, tmp_path, capsys, extra, message):
    out = tmp_path / "new" / "folder" / "s.json"
    assert message in one_line_error(_args(tiny_model_dir, text, out, *extra), capsys)
    assert files_under(tmp_path) == set()


def test_an_unwritable_out_names_out_not_the_storage(tiny_model_dir, text, tmp_path, capsys):
    msg = one_line_error(_args(tiny_model_dir, text, Path("/proc/x.json")), capsys)
    assert "--out '/proc/x.json'" in msg and "storage" not in msg.lower()


def test_show_save_names_the_target(tmp_path, capsys):
    msg = one_line_error(["show", "--reference", "uniform", "--budget", "0.3", "--layers", "4", "--save",
                          "/proc/ref.json"], capsys)  # fmt: skip
    assert "/proc/ref.json" in msg and ".tmp" not in msg


def test_search_refuses_a_profile_made_with_other_settings(tiny_model_dir, text, tmp_path, capsys):
    out = tmp_path / "s.json"
    profile = ["profile", *_args(tiny_model_dir, text, out)[1:]]
    assert main(profile) == 0
    capsys.readouterr()
    search = ["search", *_args(tiny_model_dir, text, out, "--trials", "2")[1:]]
    search[search.index("128")] = "192"  # --context-length
    msg = one_line_error(search, capsys)
    assert "was measured with other settings: context_length 128 (now 192)" in msg and "calibrate profile" in msg
    assert not out.exists() and not out.with_suffix(".optuna.db").exists()


def test_the_settings_difference_names_an_option_given_on_one_side_only():
    """What `calibrate search` says of a profile measured with other settings names an option that only one side
    gave (the key leaves out options at their defaults), and nothing for settings saved before an option existed."""
    from calibrate.settings import Settings

    assert Settings().difference(Settings(profile_continuation=64).__dict__) == "profile_continuation 64 (now 'unset')"
    assert Settings(profile_continuation=64).difference(Settings().__dict__) == "profile_continuation 'unset' (now 64)"
    before = {k: v for k, v in Settings().__dict__.items() if k != "profile_continuation"}
    assert Settings().difference(before) == "none"
    assert Settings(context_length=512).difference(before) == "context_length 1024 (now 512)"


def _interrupt_when(cmd: list[str], ready, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `cmd`, send it Ctrl-C (SIGINT) as soon as `ready()` holds, and return what it printed."""
    # a background job's children inherit SIGINT ignored (CI may run us so): give the command Ctrl-C back
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_one_line_interrupt(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 130, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.rstrip().splitlines()[-1] == "calibrate: interrupted"


def test_ctrl_c_in_the_profile_keeps_finished_curves_and_the_rerun_reuses_them(tiny_model_dir, text, tmp_path,
                                                                               capsys):  # fmt: skip
    plain = tmp_path / "plain" / "s.json"
    assert main(_args(tiny_model_dir, text, plain, "--trials", "6")) == 0
    out = tmp_path / "cut" / "s.json"
    partial = out.with_name("s.profile.partial.safetensors")

    def curves_done() -> int:
        from safetensors import safe_open

        try:
            with safe_open(str(partial), framework="pt") as f:
                return len(f.keys())
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            return 0

    cmd = [sys.executable, "-m", "calibrate", *_args(tiny_model_dir, text, out, "--trials", "6")]
    _assert_one_line_interrupt(_interrupt_when(cmd, lambda: curves_done() >= 6))
    assert partial.is_file() and not out.exists() and not out.with_suffix(".optuna.db").exists()
    capsys.readouterr()
    assert main(_args(tiny_model_dir, text, out, "--trials", "6")) == 0
    printed = capsys.readouterr().out
    assert "resuming profile: " in printed and " of 13 curves done" in printed  # recall + 4 layers + 4 x 2 heads
    assert not partial.exists()
    assert runtime.load_schedule(out).head_ratios == runtime.load_schedule(plain).head_ratios


def test_ctrl_c_in_the_search_keeps_finished_trials_and_ends_as_if_uninterrupted(tiny_model_dir, text, tmp_path,
                                                                                  capsys):  # fmt: skip
    plain = tmp_path / "plain" / "s.json"
    assert main(_args(tiny_model_dir, text, plain, "--trials", "12")) == 0
    out = tmp_path / "cut" / "s.json"
    db = out.with_suffix(".optuna.db")
    cmd = [sys.executable, "-m", "calibrate", *_args(tiny_model_dir, text, out, "--trials", "300")]
    # past the 6 enqueued baselines: the trial in flight is a sampled one
    _assert_one_line_interrupt(_interrupt_when(cmd, lambda: _trials_so_far(db).count("COMPLETE") >= 8))
    finished = _trials(db).count("COMPLETE")
    assert 8 <= finished < 12 and not out.exists()
    capsys.readouterr()
    assert main(_args(tiny_model_dir, text, out, "--trials", "12")) == 0
    printed = capsys.readouterr().out
    assert "profile: reusing" in printed and f"has {finished} finished trials" in printed
    cut, whole = runtime.load_schedule(out), runtime.load_schedule(plain)
    assert (cut.ratios, cut.head_ratios, cut.selection) == (whole.ratios, whole.head_ratios, whole.selection)
    assert cut.provenance["params"] == whole.provenance["params"]
    assert cut.provenance["score"] == whole.provenance["score"]


def test_ctrl_c_in_the_export_leaves_no_half_written_schedule(tiny_model_dir, text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.json"
    argv = _args(tiny_model_dir, text, out, "--budgets", "0.3,0.5", "--trials", "8")
    from runtime.schedule import Schedule

    real_save = Schedule.save

    def interrupted_save(self, path):
        if Path(path).name == "s_b0.5.json":
            raise KeyboardInterrupt
        return real_save(self, path)

    monkeypatch.setattr(Schedule, "save", interrupted_save)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "calibrate: interrupted"
    assert not (tmp_path / "s_b0.5.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(Schedule, "save", real_save)
    first = json.loads((tmp_path / "s_b0.3.json").read_text())["ratios"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "s_b0.3.json").read_text())["ratios"] == first
    assert (tmp_path / "s_b0.5.json").is_file()


def test_the_profiles_time_estimate_starts_after_the_resumed_curves(monkeypatch, capsys):
    """Resumed curves report at once: the pace is taken from a measured one, within one phase."""
    import torch

    from calibrate import profile_store

    class Resumed:  # all 4 layer curves and the first head curve done before
        tensors = {k: torch.zeros(1) for k in ("recall", "overlap", "window_recall", "layer.0", "layer.1",
                                               "layer.2", "layer.3", "head.0.0")}  # fmt: skip

    clock = iter([0.0, 0.0, 100.0, 110.0, 999.0])
    monkeypatch.setattr(profile_store.time, "perf_counter", lambda: next(clock))
    report = profile_store._estimate(lambda *a, **k: None, Resumed(), total=13, layers=4)
    # as profiling.single_layer_kl reports it: a head curve of layer l costs 4 - l + 4/6 of the work
    cost = [4 - layer + 4 / 6 for layer in range(4) for _ in range(2)]

    def work(done: int) -> tuple[float, float]:
        return sum(cost[:done]), sum(cost)

    report("layer sensitivity", 4, 4, work=(14.0, 14.0))  # resumed: starts the layer phase's clock, not the heads'
    report("head sensitivity", 1, 8, work=work(1))  # resumed
    report("head sensitivity", 1, 8, work=work(1))  # a tqdm refresh of the same count: the clock restarts
    report("head sensitivity", 2, 8, work=work(2))  # the first measured head curve (layer 0): 10 s
    report("head sensitivity", 3, 8, work=work(3))  # told once only
    # 10 s for 4.67 units of work, 16 units left: 34 s, although 6 of the 8 curves are left
    assert capsys.readouterr().out.splitlines() == [
        "profile: about 0.6 min for the 6 curves left (from the pace so far; a deeper layer's curve is cheaper; "
        "--head-curves fisher, --no-per-head or --quick for less)"
    ]


def test_the_profiles_time_estimate_counts_the_head_phase_from_the_layer_pace(monkeypatch, capsys):
    """Told during the layer phase, the estimate adds the head phase as `head_work` layer phases."""
    from calibrate import profile_store

    class Fresh:
        tensors: dict = {}

    clock = iter([0.0, 10.0])
    monkeypatch.setattr(profile_store.time, "perf_counter", lambda: next(clock))
    report = profile_store._estimate(lambda *a, **k: None, Fresh(), total=6, layers=4, head_work=0.5)
    report("layer sensitivity", 0, 4, work=(0.0, 10.0))  # the measuring starts
    report("layer sensitivity", 1, 4, work=(4.0, 10.0))  # 10 s for 4 units: 6 left + 0.5 x 10 of the heads
    assert capsys.readouterr().out.startswith("profile: about 0.5 min for the 4 curves left")


@pytest.mark.parametrize("resumed, told", [(0, "about 0.2 min for the 3 curves left"),
                                           (3, "about 0.3 min for the 1 curves left")])  # fmt: skip
def test_with_workers_the_estimate_waits_for_each_workers_first_curve(monkeypatch, capsys, resumed, told):
    """Two workers finish their first curves about together: the pace is taken once both did (or, with one curve
    left to measure, once it is done)."""
    from calibrate import profile_store

    class Partial:
        tensors = {f"layer.{i}": None for i in range(resumed)}

    clock = iter([0.0, 10.0, 11.0] if not resumed else [0.0, 11.0])
    monkeypatch.setattr(profile_store.time, "perf_counter", lambda: next(clock))
    report = profile_store._estimate(lambda *a, **k: None, Partial(), total=6, layers=4, head_work=0.5, workers=2)
    if not resumed:
        report("layer sensitivity", 0, 4, work=(0.0, 10.0))
        report("layer sensitivity", 1, 4, work=(4.0, 10.0))  # the first worker's curve: not told yet
        report("layer sensitivity", 2, 4, work=(7.0, 10.0))  # 11 s for 7 units: 3 left + 5 of the heads
    else:
        report("layer sensitivity", 3, 4, work=(7.0, 10.0))  # 3 resumed, 1 to measure
        report("layer sensitivity", 4, 4, work=(10.0, 10.0))  # 11 s for 3 units: 0 left + 5 of the heads
    assert capsys.readouterr().out.startswith(f"profile: {told}")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "s.json"
    assert main(_args(tiny_model_dir, shared_data / "tinyshakespeare" / "input.txt", out, "--trials", "10")) == 0
    return out


def _ctrl_c_in_a_commit_of(monkeypatch, owner, name: str) -> dict[str, bool]:
    """Press Ctrl-C just after the first SQL statement that `owner.name` runs once the study is at trial 7, before
    its transaction is committed: the moment a real Ctrl-C lands in Optuna's storage code."""
    import optuna
    from sqlalchemy.engine.default import DefaultDialect

    state = {"armed": False, "fired": False}
    real_execute, real = DefaultDialect.do_execute, getattr(owner, name)

    def execute(self, *args, **kwargs):
        result = real_execute(self, *args, **kwargs)
        if state["armed"] and not state["fired"]:
            state["fired"] = True
            signal.raise_signal(signal.SIGINT)
        return result

    def arming(*args, **kwargs):
        trial = args[0] if args and isinstance(args[0], optuna.trial.Trial) else kwargs["trial"]
        state["armed"] = trial.number >= 7
        try:
            return real(*args, **kwargs)
        finally:
            state["armed"] = False

    monkeypatch.setattr(DefaultDialect, "do_execute", execute)
    monkeypatch.setattr(owner, name, arming)
    # a background job's children inherit SIGINT ignored (CI may run us so): Ctrl-C as in a terminal
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.default_int_handler)
    return state


@pytest.mark.parametrize("call", ["suggest_categorical", "report", "set_user_attr", "_tell_with_warning"])
def test_ctrl_c_inside_any_storage_call_of_a_trial_stops_cleanly(call, uninterrupted, tiny_model_dir, text, tmp_path,
                                                                   monkeypatch, capsys):  # fmt: skip
    import optuna

    owner = optuna.study._optimize if call == "_tell_with_warning" else optuna.trial.Trial
    out = tmp_path / "s.json"
    previous = signal.getsignal(signal.SIGINT)
    try:
        with monkeypatch.context() as m:
            fired = _ctrl_c_in_a_commit_of(m, owner, call)
            code = main(_args(tiny_model_dir, text, out, "--trials", "10"))
    finally:
        signal.signal(signal.SIGINT, previous)
    printed = capsys.readouterr()
    assert fired["fired"] and code == 130, printed.err[-2000:]
    assert printed.err.rstrip().splitlines()[-1] == "calibrate: interrupted"
    states = _trials(out.with_suffix(".optuna.db"))
    assert "RUNNING" not in states and states.count("COMPLETE") >= 7 and not out.exists()
    assert main(_args(tiny_model_dir, text, out, "--trials", "10")) == 0
    cut, whole = runtime.load_schedule(out), runtime.load_schedule(uninterrupted)
    assert (cut.ratios, cut.head_ratios, cut.selection) == (whole.ratios, whole.head_ratios, whole.selection)
    assert cut.provenance["score"] == whole.provenance["score"]
