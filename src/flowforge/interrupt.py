"""A stop request that long computations act on between two of their inner evaluations.

A signal handler of the training layer calls :func:`request_stop` (on SIGTERM); expensive inner loops of the
math core (an ODE solve's function evaluations) call :func:`check`, which raises :class:`StopRequested` once a
stop was requested.  The caller that owns the run (the training loop) turns it into its normal way of stopping;
the interrupted computation's partial results are discarded.  Nothing here knows about Lightning or Hydra.
"""

from __future__ import annotations

_requested = False


class StopRequested(BaseException):
    """A stop was requested (SIGTERM) while a long computation ran.  A ``BaseException``, like
    ``KeyboardInterrupt``, so that code catching ``Exception`` to recover from numerical failures does not swallow
    it."""


def request_stop() -> None:
    """Ask running computations to stop at their next :func:`check` (safe to call from a signal handler)."""
    global _requested
    _requested = True


def clear() -> None:
    """Forget a stop request (at the start of a new run or stage)."""
    global _requested
    _requested = False


def stop_requested() -> bool:
    return _requested


def check() -> None:
    """Raise :class:`StopRequested` when a stop was requested; call it between inner evaluations of a long loop."""
    if _requested:
        raise StopRequested("stop requested (SIGTERM)")
