"""The CPU memory allocator: tcmalloc (or jemalloc) where installed, else glibc with its mmap path turned off.

Why: each backward writes fresh weight gradients, as large as the experts (64 fine-grained experts have 21× the
dense layer's parameters). glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
mmap and returns it on free, so those gradients are page-faulted in every step at a few GB/s. tcmalloc and
jemalloc keep freed pages; so does glibc with `mmap_max=0` and a high trim threshold (its tunables, read at start).

An allocator is chosen at process start only, so `aoe-ep train` and `aoe-ep bench` re-execute themselves once with
the allocator set (`ensure_allocator`) when they compute on the CPU (a CUDA run is left as it is), and say so; the
launch scripts export the same settings before torchrun (`python -m aoe_ep.cpu_allocator` prints them).
`AOE_EP_ALLOCATOR=system` leaves the process as it is; `tcmalloc`, `jemalloc` or `glibc` ask for one. A missing
library never fails a run: it falls back to glibc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1"),
}
SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
)
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_APPLIED = "AOE_EP_ALLOCATOR_APPLIED"


def find_library(name: str) -> Optional[str]:
    for directory in SEARCH_DIRS:
        for lib in LIBRARIES[name]:
            path = Path(directory) / lib
            if path.exists():
                return str(path)
    return None


def active_allocator() -> str:
    """What this process allocates with: 'tcmalloc', 'jemalloc', 'glibc (mmap off)' or 'glibc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    if "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc (mmap off)"
    return "glibc"


def allocator_env(environ: Optional[dict] = None) -> dict[str, str]:
    """The environment variables that select the allocator `AOE_EP_ALLOCATOR` asks for (default: the best found)."""
    environ = os.environ if environ is None else environ
    wanted = environ.get("AOE_EP_ALLOCATOR", "auto")
    if wanted == "system":
        return {}
    for name in ("tcmalloc", "jemalloc"):
        if wanted in ("auto", name):
            path = find_library(name)
            if path:
                preload = environ.get("LD_PRELOAD", "")
                return {"LD_PRELOAD": f"{path}:{preload}" if preload else path}
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {"GLIBC_TUNABLES": f"{tunables}:{GLIBC_TUNABLES}" if tunables else GLIBC_TUNABLES}


def ensure_allocator(argv: list[str]) -> None:
    """Re-execute this command once with the allocator set, unless it already is or `AOE_EP_ALLOCATOR=system`."""
    if os.environ.get(_APPLIED) or os.environ.get("AOE_EP_ALLOCATOR") == "system":
        return
    env = allocator_env()
    if not env or active_allocator() != "glibc":
        return
    os.environ.update(env)
    os.environ[_APPLIED] = "1"
    try:
        os.execv(sys.executable, [sys.executable, "-m", "aoe_ep.cli", *argv])
    except OSError:
        return  # keep running as we are


def announce() -> str:
    """The line a CPU run prints: the allocator, and whether this process was re-executed to load it."""
    how = (
        "this command re-executed itself to load it; AOE_EP_ALLOCATOR=system runs it as started"
        if os.environ.get(_APPLIED)
        else "as the process started"
    )
    return f"aoe-ep: CPU run, memory allocator {active_allocator()} ({how})"


if __name__ == "__main__":  # the launch scripts: `eval "$(python -m aoe_ep.cpu_allocator)"`
    for key, value in allocator_env().items():
        print(f"export {key}='{value}'")
    print(f"export {_APPLIED}=1")
