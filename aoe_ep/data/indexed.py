"""Checks on a megatron-core indexed dataset (`PREFIX.bin` + `PREFIX.idx`) and its `PREFIX.meta.json` sidecar.

megatron-core reads these files with asserts and memory maps, so a truncated file or one tokenized with another
vocabulary surfaces as an AssertionError deep inside it, or as silently wrong tokens. Everything here runs before
it and turns each of those cases into one `DataError` that names the file.

The .idx layout (megatron-core `_IndexWriter`): 9 magic bytes `MMIDIDX\\0\\0`, version (u64 = 1), token dtype code
(u8), S = sequence count (u64), D = document-boundary count (u64), then S int32 lengths, S int64 byte offsets into
.bin, D int64 boundaries (0 first, S last). The .bin is the tokens, back to back: sum(lengths) x dtype size bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from aoe_ep.data.errors import DataError
from aoe_ep.data.tokenizer import Tokenizer

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
# megatron-core DType codes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
META_FORMAT = "aoe-ep indexed dataset"
_CHUNK = 1 << 24  # index entries checked at a time


@dataclass(frozen=True)
class IndexInfo:
    """What the .idx says about a dataset that passed `inspect_dataset`."""

    prefix: str
    dtype: type
    sequence_lengths: np.ndarray  # tokens per sequence; aoe-ep writes one sequence per document
    num_tokens: int


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def inspect_dataset(prefix: str) -> IndexInfo:
    """Check that PREFIX.idx and PREFIX.bin exist and agree with each other; `DataError` otherwise."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    has_idx, has_bin = os.path.isfile(idx), os.path.isfile(bin_)
    if not (has_idx and has_bin):
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f"; data.paths takes the prefix, without .bin/.idx: {prefix[:-4]}"
        if not has_idx and not has_bin:
            raise DataError(f"{prefix}: no dataset here ({bin_} and {idx} do not exist){hint}")
        missing, present = (idx, bin_) if not has_idx else (bin_, idx)
        raise DataError(f"{missing} is missing (its pair {present} exists){hint}")

    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise DataError(f"{idx} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    if header[:9] != INDEX_MAGIC:
        raise DataError(
            f"{idx} is not a megatron-core index file (its first bytes are {header[:9]!r}, expected {INDEX_MAGIC!r})"
        )
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataError(f"{idx}: index version {version}, only version 1 is readable")
    if code not in DTYPES:
        raise DataError(f"{idx} is corrupt: unknown token dtype code {code}")
    expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if size != expected:
        raise DataError(
            f"{idx} is truncated or corrupt: its header promises {n_seq} sequences and {n_doc} "
            f"document boundaries ({expected} bytes) but the file has {size} bytes"
        )
    if n_seq == 0:
        raise DataError(f"{idx}: the dataset holds no documents")

    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(n_seq,))
    pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * n_seq, shape=(n_seq,))
    bounds = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 12 * n_seq, shape=(n_doc,))
    dtype = DTYPES[code]
    itemsize = np.dtype(dtype).itemsize
    end = 0  # bytes of .bin before the current chunk; chunks keep the memory bounded for billions of documents
    for i in range(0, n_seq, _CHUNK):
        chunk = np.asarray(lengths[i : i + _CHUNK], dtype=np.int64)
        if chunk.min() < 0:
            raise DataError(f"{idx} is corrupt: negative sequence length")
        starts = end + np.concatenate(([0], np.cumsum(chunk[:-1]))) * itemsize
        if not np.array_equal(pointers[i : i + _CHUNK], starts):
            raise DataError(f"{idx} is corrupt: its byte offsets do not follow from its sequence lengths")
        end = int(starts[-1] + chunk[-1] * itemsize)
    if (
        n_doc < 2
        or bounds[0] != 0
        or bounds[-1] != n_seq
        or any(np.any(np.diff(bounds[i : i + _CHUNK + 1]) < 0) for i in range(0, n_doc, _CHUNK))
    ):
        raise DataError(f"{idx} is corrupt: its document boundaries do not run from 0 to {n_seq}")

    bin_size, bin_expected = os.path.getsize(bin_), end
    if bin_expected == 0:
        raise DataError(f"{idx}: the dataset holds no tokens")
    if bin_size != bin_expected:
        raise DataError(
            f"{bin_} is truncated or corrupt: {idx} describes {bin_expected // itemsize} tokens of "
            f"{np.dtype(dtype).name} ({bin_expected} bytes) but the file has {bin_size} bytes"
        )
    return IndexInfo(prefix=prefix, dtype=dtype, sequence_lengths=lengths, num_tokens=bin_expected // itemsize)


def write_meta(
    path: str,
    tokenizer: Tokenizer,
    documents: int,
    tokens: int,
    max_token_id: int,
    sources: list[str],
    skipped_empty: int,
) -> None:
    """The sidecar: which tokenizer made the dataset, and its counts."""
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "tokenizer": {
            "name": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "unique_identifiers": tokenizer.unique_identifiers,
        },
        "documents": documents,
        "tokens": tokens,
        "max_token_id": max_token_id,
        "skipped_empty_documents": skipped_empty,
        "sources": sources,
    }
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_meta(prefix: str) -> Optional[dict[str, Any]]:
    """The sidecar of PREFIX, or None for datasets made by other tools (megatron's preprocess_data.py)."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        meta = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is corrupt: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{path} is not an aoe-ep dataset sidecar (no format: {META_FORMAT!r})")
    return meta


def check_tokenizer(info: IndexInfo, tokenizer: Tokenizer) -> None:
    """The dataset was made with `tokenizer` (by its sidecar), and every token id is below `tokenizer.vocab_size`.

    Without a sidecar only the second can be checked, by reading the whole .bin once.
    """
    prefix, bin_ = info.prefix, info.prefix + ".bin"
    meta = read_meta(prefix)
    if meta is not None:
        path = meta_path(prefix)
        made_with = meta.get("tokenizer", {})
        if json.loads(json.dumps(tokenizer.unique_identifiers)) != made_with.get("unique_identifiers"):
            raise DataError(
                f"{bin_} was tokenized with {made_with.get('name')!r} (vocab_size {made_with.get('vocab_size')}, "
                f"per {path}) but data.tokenizer is {tokenizer.name!r} (vocab_size {tokenizer.vocab_size}): "
                f"set data.tokenizer to the tokenizer of the data, or re-run `aoe-ep preprocess` with this one"
            )
        if meta.get("tokens") != info.num_tokens:
            raise DataError(
                f"{path} records {meta.get('tokens')} tokens but {bin_} holds {info.num_tokens}: the "
                f"sidecar belongs to another dataset; re-run `aoe-ep preprocess`"
            )
        max_id = int(meta.get("max_token_id", -1))
    else:
        max_id = _max_token_id(bin_, info.dtype)
    if max_id >= tokenizer.vocab_size:
        raise DataError(
            f"{bin_} holds token id {max_id}, outside the vocabulary of data.tokenizer "
            f"{tokenizer.name!r} (vocab_size {tokenizer.vocab_size}): the data was made with another "
            f"tokenizer"
        )


def _max_token_id(bin_path: str, dtype: type, chunk: int = 1 << 26) -> int:
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    try:
        return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))
    finally:
        del tokens
