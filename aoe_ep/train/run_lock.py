"""One run per out_dir: an advisory lock that rank 0 holds for the run's life.

`<out_dir>/.lock` is locked with `fcntl.flock`, which the operating system releases when the process ends in any
way (SIGKILL included), and `<out_dir>/.lock.pid` names the holder (pid, host, start time) for the message a second
run gets. A pid file left by a holder that no longer runs (its lock is free) is a stale lock: it is reported and
taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from aoe_ep.config import ConfigError

LOCK_NAME = ".lock"
PID_NAME = ".lock.pid"


def prepare_out_dir(out_dir: Path) -> None:
    """Create train.out_dir, or say in one line why it cannot be."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir: {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"train.out_dir: cannot create {out_dir}: {err.strerror or err}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir: {out_dir} is not writable")


def _holder(pid_file: Path) -> Optional[dict]:
    try:
        holder = json.loads(pid_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive_here(holder: dict) -> bool:
    """False only for a holder on this host whose pid no longer runs (the stale record of a previous holder)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # it exists (owned by someone else)
    return True


def _current_holder(pid_file: Path, wait_s: float = 5.0) -> Optional[dict]:
    """The record of the process holding the lock. It writes its pid file just after locking, so a run that
    started at the same moment may look before that write, or while the previous holder's stale record is still
    there: wait (briefly) for a record naming a live process."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = _holder(pid_file)
        if (holder is not None and _alive_here(holder)) or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


def _describe(holder: Optional[dict]) -> str:
    if holder is None:
        return "a process whose pid file is missing or unreadable"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


@dataclass
class RunLock:
    """A held lock; `stale`: the description of a dead holder whose lock was taken over (None if there was none)."""

    out_dir: Path
    fd: int
    stale: Optional[str] = None

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        """Lock `out_dir` (which exists) or raise a ConfigError naming the run that holds it."""
        lock_file, pid_file = out_dir / LOCK_NAME, out_dir / PID_NAME
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"train.out_dir: cannot create the run lock {lock_file}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"train.out_dir: {out_dir} is in use by another run ({_describe(_current_holder(pid_file))}); "
                f"wait for it to end, or set train.out_dir to another directory"
            ) from None
        except OSError as err:
            os.close(fd)
            raise ConfigError(f"train.out_dir: cannot lock {lock_file}: {err.strerror or err}") from None
        previous = _holder(pid_file) if pid_file.exists() else None
        stale = _describe(previous) if pid_file.exists() else None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = pid_file.with_name(pid_file.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, pid_file)
        return cls(out_dir, fd, stale)

    def release(self) -> None:
        """Remove the pid file and unlock (the OS also unlocks if the process dies before this runs)."""
        if self.fd < 0:
            return
        try:
            (self.out_dir / PID_NAME).unlink(missing_ok=True)
        except OSError:
            pass  # the lock itself is released below whatever happens to the pid file
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1
