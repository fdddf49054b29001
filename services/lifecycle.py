"""Stop a foreground service cleanly on SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C).

`stop_signals()` turns either signal into `StopRequested`, raised in the main thread wherever it
is (starting, serving or waiting), so that the ``finally`` blocks that stop the app, Serve, Ray and
the embedded Redis run. SIGINT is handled even when the process started with it ignored (a shell
script's background job, ``nohup``). A second signal while the stop is under way is noted and
otherwise ignored: interrupting the cleanup half way is what leaves processes behind.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so `except Exception` does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopGuard:
    """What `stop_signals` yields: call `stopping()` when the cleanup starts for another reason, so a
    signal then no longer interrupts it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._stopping = False

    def stopping(self) -> None:
        self._stopping = True

    def _handle(self, signum: int, frame) -> None:
        if self._stopping:
            print(f"{signal.Signals(signum).name}: already stopping, please wait", file=sys.stderr, flush=True)
            return
        self._stopping = True
        self.signum = signum
        raise StopRequested(signum)


@contextlib.contextmanager
def stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopGuard]:
    """Within the block, the first of `signals` raises StopRequested in the main thread; later ones are ignored."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_signals() must be used in the main thread (signal handlers live there)")
    guard = StopGuard()
    previous = {s: signal.signal(s, guard._handle) for s in signals}
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def wait_forever() -> None:
    """Sleep until a signal handler raises (StopRequested, KeyboardInterrupt)."""
    while True:
        time.sleep(3600)


__all__ = ["STOP_SIGNALS", "StopGuard", "StopRequested", "stop_signals", "wait_forever"]
