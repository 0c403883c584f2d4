"""SIGTERM / SIGINT during training: finish the step, checkpoint on every rank together, exit 128 + signal.

The handler only notes the signal; at the end of each step the ranks agree through the all-reduce they do anyway
(`requested()` goes into it), so all of them save at the same step even if only one was signalled. A second
signal exits at once without the checkpoint (e.g. a rank stuck in a collective).
"""

from __future__ import annotations

import signal


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signals: list[int] = []

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.signals:
            raise SystemExit(128 + signum)
        self.signals.append(signum)

    def requested(self) -> bool:
        return bool(self.signals)

    def signum(self) -> int:
        """The signal to exit with: this rank's, or SIGTERM when another rank was the one signalled."""
        return int(self.signals[0]) if self.signals else int(signal.SIGTERM)

    def name(self) -> str:
        return signal.Signals(self.signum()).name
