"""Output directories written whole or not at all: everything goes into a hidden sibling directory that is renamed
to the destination only once complete, so a failure leaves the destination as it was (absent or empty)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from aoe_ep.hf.errors import ConversionError


def check_destination(out_dir: str | Path) -> Path:
    """The destination as a Path; refused when it exists and holds anything."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: already exists and is not an empty directory; choose a new OUT_DIR")
    return out


@contextlib.contextmanager
def staged_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes `out_dir`, on any error it is removed."""
    out = check_destination(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and loading reports off (errors are reported by the caller, in one line)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
