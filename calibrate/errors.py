"""Errors that the command line reports as one line (`calibrate: error: ...`) instead of a traceback."""


class CalibrateError(Exception):
    """An expected failure with a message that names the problem and the fix."""


class ModelError(CalibrateError):
    """A model that cannot be resolved or loaded."""
