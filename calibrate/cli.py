"""The `calibrate` command line: finds the subcommands in `calibrate/commands/` and reports expected errors
as one line (`calibrate: error: ...`, exit 2) instead of a traceback. Set PYRAMIDINFER_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import NoReturn

from runtime.schedule import ScheduleError

from . import __version__
from . import commands as _commands
from .errors import CalibrateError

EXAMPLES = """\
examples:
  calibrate show --reference pyramidkv --budget 0.3 --layers 30
  calibrate show schedules/my-schedule.json --tokens 4096
  calibrate COMMAND --help        (every command lists its own examples)
"""


# what `pip install pyramidinfer[calibrate]` adds to the base (runtime) install
EXTRA_MODULES = {"accelerate", "gguf", "datasets", "scipy", "optuna", "tqdm", "psutil", "matplotlib"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"calibrate: error: {message} (see '{self.prog} --help')\n")


def command_modules() -> list[ModuleType]:
    """Every module in calibrate/commands that defines add_parser, in help order."""
    found = []
    for info in pkgutil.iter_modules(_commands.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            found.append(module)
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="calibrate",
        description="Calibrate, inspect and compare per-layer KV cache retention schedules (pyramidinfer).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        module.add_parser(subparsers)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f"'{e.filename}': " if e.filename else ""
        return f"{where}{e.strerror}"
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a name the terminal cannot encode is escaped, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the files a command writes
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `calibrate show ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ScheduleError, CalibrateError, OSError) as e:
        if os.environ.get("PYRAMIDINFER_DEBUG"):
            raise
        print(f"calibrate: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if os.environ.get("PYRAMIDINFER_DEBUG") or (e.name or "").split(".")[0] not in EXTRA_MODULES:
            raise
        print(
            f"calibrate: error: this command needs the calibration extra (no module '{e.name}'); "
            "install it with: pip install 'pyramidinfer[calibrate]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("calibrate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
