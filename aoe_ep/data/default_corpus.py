"""The built-in corpus: this machine's Python standard library sources, so `aoe-ep train` runs on real text with no
data arguments.

The `.py` files under `sysconfig.get_paths()["stdlib"]`, one document each, in sorted path order, up to
`data.default_corpus_max_bytes` of source (about 12 MB is the whole library without tests; files are taken whole,
so the cap falls on a file boundary). `site-packages` (third-party code that differs between machines) and test
directories (deliberately odd inputs, not installed everywhere) are left out, as are files that are not UTF-8.
The last files in that order, the fewest that hold `HELD_OUT_BYTES` (64 KiB), are held out whatever the cap: they
are the default text of `aoe-ep router-free` and of the upcycling figures, which no default run trains on.
The corpus is tokenized once per tokenizer into `data.cache_dir/default_corpus/`, keyed by the tokenizer's identity
and the list of files with their sizes, then read like any dataset prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from aoe_ep.data.errors import DataError
from aoe_ep.data.indexed import meta_path
from aoe_ep.data.preprocessing import write_dataset
from aoe_ep.data.sync import on_rank0_first
from aoe_ep.data.tokenizer import Tokenizer

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


HELD_OUT_BYTES = 65_536


def library_sources(root: Optional[Path] = None) -> list[tuple[str, int]]:
    """(path relative to the stdlib, size in bytes) of every file the corpus may use, held-out ones included,
    sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(found)


def held_out_start(found: list[tuple[str, int]]) -> int:
    """Where the held-out files of `library_sources` begin: the fewest last files that hold HELD_OUT_BYTES (all
    but the first, for a library smaller than that)."""
    start, total = len(found), 0
    while start > 1 and total < HELD_OUT_BYTES:
        start -= 1
        total += found[start][1]
    return start


def stdlib_sources(max_bytes: int, root: Optional[Path] = None) -> list[tuple[str, int]]:
    """(path relative to the stdlib, size in bytes) of the corpus files, sorted, up to `max_bytes` in total; the
    held-out files are never among them."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = library_sources(root)
    found = found[: held_out_start(found)]
    chosen, total = [], 0
    for rel, size in found:
        if chosen and total + size > max_bytes:
            break
        chosen.append((rel, size))
        total += size
    if not chosen:
        raise DataError(f"{root}: no Python sources found for the default corpus; give data.paths")
    return chosen


def default_corpus_prefix(cache_dir: str, tokenizer: Tokenizer, max_bytes: int, root: Optional[Path] = None) -> str:
    """The dataset prefix of the default corpus for `tokenizer`, tokenizing it first (on rank 0) if needed."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_sources(max_bytes, root)
    key = hashlib.sha256(
        json.dumps(
            {"tokenizer": tokenizer.unique_identifiers, "root": str(root), "files": files}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", tokenizer.name)
    prefix = str(Path(cache_dir).resolve() / "default_corpus" / f"stdlib-{name}-{key}")

    def is_built() -> bool:
        return all(os.path.isfile(p) for p in (prefix + ".bin", prefix + ".idx", meta_path(prefix)))

    def build() -> str:
        if not is_built():
            total = sum(size for _, size in files)
            write_dataset(
                _documents(root, files),
                prefix,
                tokenizer,
                sources=[str(root / rel) for rel, _ in files],
                total_bytes=total,
                desc=f"default corpus ({len(files)} stdlib files)",
            )
        return prefix

    def use() -> str:
        if not is_built():
            raise DataError(
                f"{prefix}: the default corpus was not built by rank 0 (is data.cache_dir on a "
                f"filesystem all ranks share?)"
            )
        return prefix

    return on_rank0_first(build, use)


def _documents(root: Path, files: list[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    for rel, size in files:
        raw = (root / rel).read_bytes()
        try:
            yield raw.decode("utf-8"), size
        except UnicodeDecodeError:
            yield "", size  # skipped as empty, and counted
