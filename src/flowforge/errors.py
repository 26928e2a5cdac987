"""Exceptions that name the problem and the fix.

Every error raised on bad user input derives from :class:`FlowforgeError`, so callers (and the
bad-input tests) can tell our clear messages from accidental crashes.
"""


class FlowforgeError(Exception):
    """Base class of all errors raised by flowforge on bad input or failed numerics."""


class ConfigError(FlowforgeError, ValueError):
    """A configuration value is of the wrong type, out of range, or incompatible with another."""


class DataError(FlowforgeError, ValueError):
    """A dataset file is missing or corrupt, or a batch has the wrong shape or non-finite values."""


class NonFiniteLossError(FlowforgeError, FloatingPointError):
    """The training loss became NaN or infinite."""


class ConvergenceError(FlowforgeError, RuntimeError):
    """A numerical solver (root finding, fixed point, power iteration) did not converge."""
