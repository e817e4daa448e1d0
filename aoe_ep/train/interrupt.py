"""Ctrl-C held back over a section that must not be cut short, such as writing a checkpoint.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode the main thread runs. Inside a checkpoint write
that can be a callback that torch's C++ serializer made: the interruption is then either swallowed there (the run
goes on as if nothing had been pressed) or turned into a garbled write error. `sigint_deferred` replaces the handler
for the section's length: a first Ctrl-C is recorded (and, where a notice is given, announced on stderr), the
section finishes, and a KeyboardInterrupt is raised as it ends; a second Ctrl-C raises at once, abandoning the
section. Outside the main thread, or when SIGINT is not Python's default handler (someone else owns it), nothing
is changed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional


@dataclass
class HeldSigint:
    """How many Ctrl-C arrived during the section (0: none)."""

    count: int = 0


@contextlib.contextmanager
def sigint_deferred(notice: Optional[str] = None) -> Iterator[HeldSigint]:
    """Hold back Ctrl-C while the block runs; raise KeyboardInterrupt after it if one arrived. `notice` (printed
    on the first Ctrl-C, e.g. "writing checkpoint step_00000100") says what is being finished; None: print
    nothing (every rank but the first)."""
    held = HeldSigint()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield held
        return

    def hold(signum, frame) -> None:
        held.count += 1
        if held.count > 1:
            raise KeyboardInterrupt
        if notice is not None:
            # os.write, not print: the handler may run while the main thread is inside a write to sys.stderr
            message = f"\naoe-ep: Ctrl-C: {notice} first (Ctrl-C again to abandon it)\n"
            with contextlib.suppress(OSError):
                os.write(2, message.encode())

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
    if held.count:
        raise KeyboardInterrupt
