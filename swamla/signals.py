"""Graceful preemption: turn SIGTERM / SIGINT into a flag the training loop polls.

    with StopSignal() as stop:
        for step in ...:
            train_step()
            if stop.should_stop:
                save_checkpoint(); break

Handlers are installed only inside the ``with`` block (never at import) and the previous ones are
restored on exit. A second SIGINT raises KeyboardInterrupt, so Ctrl-C twice still aborts a run that
hangs. On several hosts each process sees only its own signal: trainers should agree on stopping
(e.g. an all-reduce max of the flag) before saving.
"""

from __future__ import annotations

import signal
import threading


class StopSignal:
    """Context manager whose ``should_stop`` turns true once one of ``signals`` arrives."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.should_stop = False
        self.received: int | None = None  # the first signal number caught
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.should_stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.should_stop = True
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal must be entered in the main thread (Python delivers "
                               "signals only there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the old handler was not installed from Python; the default is the best restore
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def request_stop(self) -> None:
        """Set the flag from code (e.g. after the processes agreed to stop)."""
        self.should_stop = True
