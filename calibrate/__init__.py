"""pyramidinfer calibration tools: load models, build reference schedules, calibrate and inspect schedules.

The command line is `calibrate` (see `calibrate --help`); each subcommand lives in `calibrate/commands/`.
"""

__version__ = "0.1.0"
