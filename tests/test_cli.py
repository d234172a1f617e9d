"""The `calibrate` command line, run as a user would: a separate process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.reference import uniform
from runtime.schedule import load_schedule


def calibrate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `calibrate` script (or `python -m calibrate` when it is not installed)."""
    script = Path(sys.executable).parent / "calibrate"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "calibrate"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, cwd=cwd)


def mean_fraction(stdout: str) -> float:
    m = re.search(r"mean KV fraction at \d+ prompt tokens: ([0-9.]+)", stdout)
    assert m, stdout
    return float(m.group(1))


def table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"^\s+\d+\s+(\d\.\d{4}|full)\s", line)]


def test_show_file(tmp_path: Path):
    path = uniform(4, 0.5, sinks=4, window=32, context_length=100, name="hand").save(tmp_path / "u.json")
    out = calibrate("show", str(path))
    assert out.returncode == 0, out.stderr
    assert "schedule: hand" in out.stdout
    rows = table_rows(out.stdout)
    assert len(rows) == 4
    assert all(row.split()[1:4] == ["0.5000", "68", "68.0%"] for row in rows)
    assert mean_fraction(out.stdout) == 0.68


def test_show_tokens(tmp_path: Path, capsys: pytest.CaptureFixture):
    from calibrate.cli import main

    path = uniform(4, 0.5, sinks=4, window=32, context_length=100).save(tmp_path / "u.json")
    assert main(["show", str(path), "--tokens", "1000"]) == 0  # context 964 * 0.5 = 482, + 36 = 518
    out = capsys.readouterr().out
    assert mean_fraction(out) == 0.518
    assert "tokens kept of 1000" in out


def test_show_lists_per_head_shares(tmp_path: Path, capsys: pytest.CaptureFixture):
    from calibrate.cli import main
    from runtime.schedule import Schedule

    heads = [[0.2, 0.6], [0.5, 0.5]]
    path = Schedule(ratios=[0.4, 0.5], head_ratios=heads, sinks=4, window=32).save(tmp_path / "h.json")
    assert main(["show", str(path), "--tokens", "100"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0].endswith("heads 0.20/0.60") and "heads" not in rows[1]  # equal shares: one tensor, no note


def test_show_reference_and_save(tmp_path: Path):
    target = tmp_path / "pkv.json"
    out = calibrate("show", "--reference", "pyramidkv", "--budget", "0.3", "--layers", "30", "--save", str(target))
    assert out.returncode == 0, out.stderr
    assert len(table_rows(out.stdout)) == 30
    assert abs(mean_fraction(out.stdout) - 0.3) < 1e-3
    assert "█" in out.stdout
    saved = json.loads(target.read_text())
    assert saved["budget"] == 0.3 and len(saved["ratios"]) == 30
    assert abs(load_schedule(target).kv_fraction(2048) - mean_fraction(out.stdout)) < 1e-4


@pytest.mark.parametrize("args", [["--help"], ["show", "--help"]])
def test_help_has_examples(args: list[str]):
    out = calibrate(*args)
    assert out.returncode == 0
    assert "examples:" in out.stdout
    assert "calibrate show --reference" in out.stdout


def _bad_file(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BAD = {
    "missing file": lambda t: ["show", str(t / "missing.json")],
    "invalid json": lambda t: ["show", _bad_file(t, "x.json", "{oops")],
    "bad ratio": lambda t: [
        "show",
        _bad_file(t, "r.json", json.dumps({**uniform(2, 0.5).to_dict(), "ratios": [2, 1]})),
    ],
    "budget above 1": lambda t: ["show", "--reference", "uniform", "--budget", "1.5"],
    "budget below minimum": lambda t: ["show", "--reference", "uniform", "--budget", "0.01"],
    "budget not a number": lambda t: ["show", "--reference", "uniform", "--budget", "lots"],
    "unknown kind": lambda t: ["show", "--reference", "snapkv", "--budget", "0.3"],
    "file and reference": lambda t: ["show", "x.json", "--reference", "uniform", "--budget", "0.3"],
    "nothing to show": lambda t: ["show"],
    "tokens zero": lambda t: ["show", "--reference", "uniform", "--budget", "0.3", "--tokens", "0"],
    "unknown option": lambda t: ["show", "--bogus"],
    "unknown command": lambda t: ["frobnicate"],
    "no command": lambda t: [],
}


def _check_one_line_error(returncode: int, stdout: str, stderr: str) -> None:
    assert returncode == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("calibrate: error: ")
    assert stdout == ""


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line(tmp_path: Path, case: str, capsys: pytest.CaptureFixture):
    """Every bad input, in-process (fast): exit 2, one line on stderr, nothing on stdout."""
    from calibrate.cli import main

    try:
        code = main(BAD[case](tmp_path))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    captured = capsys.readouterr()
    _check_one_line_error(code, captured.out, captured.err)


@pytest.mark.parametrize("case", ["missing file", "budget above 1", "unknown option"])
def test_bad_input_is_one_line_in_a_process(tmp_path: Path, case: str):
    """The same, as a user sees it: a separate process whose stderr shows no traceback."""
    out = calibrate(*BAD[case](tmp_path))
    _check_one_line_error(out.returncode, out.stdout, out.stderr)
