"""Ctrl-C while the driver runs a call on every rank. The workers ignore SIGINT and go on with the
step; a driver that stopped halfway would leave them waiting in a collective it never joins, out of
step for good. So during a call the first Ctrl-C is held back: the call finishes on every rank,
and only then is the interrupt raised (by the handler that was installed: KeyboardInterrupt by
default), between calls, where the engine requeues the step's sequences as it does without
tensor parallelism. A second Ctrl-C during the same call is not held back: the user will not wait
for the step, and the driver then stops the engine (its ranks are out of step).

Only the main thread receives signals, and only it may install a handler: a call made on another
thread (the server's engine thread) runs as it is."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("pixtral_fast")


class InterruptsHeldBack:
    """`with held:` runs a call with the first SIGINT held back; `held.deliver()` afterwards raises
    it (calls the handler that was installed), once the ranks are in step again."""

    def __init__(self):
        self.pending: tuple | None = None  # (signum, frame) of the held-back interrupt
        self._handler = None               # the handler in place before, while ours is installed

    def __enter__(self) -> "InterruptsHeldBack":
        if threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):  # SIG_IGN / SIG_DFL / a C handler: nothing of Python's to hold back
                self._handler = handler
                signal.signal(signal.SIGINT, self._hold)
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)

    def _hold(self, signum, frame) -> None:
        if self.pending is not None:  # the second one: stop waiting (and so stop the engine)
            self._handler(signum, frame)
            return
        self.pending = (signum, frame)
        log.warning("interrupted: the tensor-parallel step in flight finishes on every rank first "
                    "(interrupt again to stop the engine now)")

    def deliver(self) -> None:
        """The held-back interrupt, if one came: its handler runs now (KeyboardInterrupt by default)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._handler(*pending)
