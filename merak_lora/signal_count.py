"""How many times a signal arrived, which Python's handlers alone do not tell.

CPython runs a signal's handler once for however many of that signal arrived since it last ran, so two Ctrl-Cs
that land inside one blocking call (a collective, a long kernel, the launcher's wait) look like one: a second
Ctrl-C then saves instead of stopping at once. The C-level handler also writes one byte per signal, its number,
to the wakeup fd (`signal.set_wakeup_fd`); here that fd is a pipe, and a handler asks how many of its signal are
in it.
"""

from __future__ import annotations

import collections
import os
import signal


class SignalCount:
    """Install in the main thread before the handlers that ask it; `close` puts the previous wakeup fd back."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
        self.previous = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.pending: collections.Counter = collections.Counter()

    def arrived(self, signum: int) -> int:
        """How many `signum` arrived since its handler last asked (at least one: its handler is asking)."""
        try:
            while data := os.read(self.read_fd, 4096):
                self.pending.update(data)
        except BlockingIOError:
            pass
        return max(self.pending.pop(signum, 0), 1)

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous)
        os.close(self.read_fd)
        os.close(self.write_fd)
