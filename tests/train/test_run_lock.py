"""The run lock's message for a run started at the same moment as the holder."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from aoe_ep.config import ConfigError
from aoe_ep.train.run_lock import LOCK_NAME, PID_NAME, RunLock


def _record(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}) + "\n"


@pytest.fixture
def held(tmp_path):
    """`tmp_path` locked as a holder that has not yet written its pid file (flock conflicts between two open file
    descriptions, even in one process)."""
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield tmp_path
    os.close(fd)


def _write_later(path, text: str, after_s: float = 0.3) -> threading.Timer:
    timer = threading.Timer(after_s, path.write_text, (text,))
    timer.start()
    return timer


def test_the_holders_pid_file_written_just_after_the_lock_is_waited_for(held):
    timer = _write_later(held / PID_NAME, _record(os.getpid()))
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()} on "):
        RunLock.acquire(held)
    timer.join()


def test_a_dead_holders_record_is_not_named_while_the_new_holder_writes_its_own(held):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (held / PID_NAME).write_text(_record(int(dead.stdout)))
    timer = _write_later(held / PID_NAME, _record(os.getpid()))
    with pytest.raises(ConfigError, match=f"pid {os.getpid()} on "):
        RunLock.acquire(held)
    timer.join()
