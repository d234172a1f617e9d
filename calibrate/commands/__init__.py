"""Subcommands of `calibrate`, one module each.

A command module defines:

    ORDER = 10                      # optional: position in `calibrate --help` (default 100, then by name)
    def add_parser(subparsers):     # add its parser: subparsers.add_parser(NAME, help=..., epilog=EXAMPLES, ...)
        ...                         #   and set_defaults(func=run)
    def run(args) -> int:           # do the work; raise ScheduleError / CalibrateError for expected failures

`calibrate.cli` finds every module in this package, so adding a command is adding a file. Keep module import
cheap: import torch, transformers, optuna etc. inside `run`, so `calibrate --help` stays fast.
"""
