"""Ctrl-C and SIGTERM stop a run even where Python would swallow the exception.

Python raises a signal's exception in whatever frame runs when it next checks. If that frame
is a finalizer (``__del__``, a weakref callback, a garbage-collection pass) the exception is
printed as "ignored" and dropped, and the run would go on to put its output in place and exit
0. The handlers installed by :func:`signals_unwind` therefore also record the signal, and
:func:`raise_if_stopped` raises it again: :class:`~sparsellm.saving.StagedOutput` calls it
before anything is renamed into place, the CLI after a command returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "raise_if_stopped", "signals_unwind"]


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that everything unwinds as for Ctrl-C (staged
    output discarded) and the process ends with one line."""


_received: list[int] = []  # signals seen while the handlers are installed, oldest first


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _handler(signum: int, frame: object) -> None:
    _received.append(signum)
    raise _exception(signum)


def raise_if_stopped() -> None:
    """Raise the stop a signal asked for, if one came while :func:`signals_unwind` was active
    (a no-op otherwise): a second chance for an exception a finalizer swallowed."""
    if _received:
        raise _exception(_received[0])


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """For the duration, SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`, and
    both are remembered for :func:`raise_if_stopped`; the previous handlers are put back.
    Main thread only (signals are delivered there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
