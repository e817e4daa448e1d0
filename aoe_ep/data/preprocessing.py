"""`aoe-ep preprocess`: text files to a megatron-core indexed dataset (`PREFIX.bin`, `PREFIX.idx`) and its sidecar
`PREFIX.meta.json` (tokenizer identity, document and token counts).

Inputs, given as files or directories (searched recursively, in sorted order):
- `.txt`: by default one document per file (`txt_mode="file"`: a source file, a book); `txt_mode="paragraph"` makes
  every block between blank lines a document instead — use it for one big file of many short texts, or the split
  has nothing to put in the validation set;
- `.jsonl`: one document per line, the string in field `jsonl_key` (default `text`).
Whitespace-only documents are skipped (and counted). Each document is stored as one sequence followed by the
tokenizer's `eod`. Files are written under temporary names and renamed at the end, so an interrupted run leaves
either the previous dataset or none, never half of one.
"""

from __future__ import annotations

import aoe_ep.megatron_core  # noqa: F401  (first: megatron-core without its TE / apex start-up warnings)

# isort: split
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from aoe_ep.data.errors import DataError
from aoe_ep.data.indexed import meta_path, write_meta
from aoe_ep.data.tokenizer import Tokenizer, build_tokenizer

SUFFIXES = (".txt", ".jsonl")
TXT_MODES = ("file", "paragraph")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_BATCH_CHARS = 1 << 22  # tokenize in batches of about 4M characters (backends parallelise within a batch)
_BATCH_DOCS = 1024


@dataclass(frozen=True)
class PreprocessResult:
    prefix: str
    documents: int
    tokens: int  # eod included
    skipped_empty: int


def find_inputs(inputs: Sequence[Union[str, Path]]) -> list[Path]:
    """The .txt and .jsonl files named by `inputs` (files, or directories searched recursively), in order."""
    if not inputs:
        raise DataError("preprocess: no input files given")
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not files:
                raise DataError(f"{item}: the directory holds no .txt or .jsonl files")
            found.extend(files)
        elif item.is_file():
            if item.suffix not in SUFFIXES:
                raise DataError(
                    f"{item}: unsupported input type {item.suffix or '(no suffix)'!r}; expected .txt or .jsonl"
                )
            found.append(item)
        else:
            raise DataError(
                f"{item}: not a regular file or directory (a device or pipe cannot be read as documents)"
                if item.exists()
                else f"{item}: no such file or directory"
            )
    return list(dict.fromkeys(found))


def read_documents(path: Path, jsonl_key: str = "text", txt_mode: str = "file") -> Iterator[tuple[str, int]]:
    """(document text, input bytes consumed) for each document of one input file."""
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, jsonl_key)
        return
    raw = path.read_bytes()
    text = _decode(raw, str(path))
    if txt_mode == "file":
        yield text, len(raw)
        return
    blocks = _BLANK_LINE.split(text)
    for i, block in enumerate(blocks):
        yield block.strip("\n"), len(raw) if i == len(blocks) - 1 else 0


def _read_jsonl(path: Path, key: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(_decode(line, where))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict) or key not in obj:
                fields = ", ".join(map(repr, obj)) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                raise DataError(
                    f"{where}: no {key!r} field (found {fields or 'no fields'}); choose the field with --jsonl-key"
                )
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: field {key!r} holds {type(obj[key]).__name__}, not a string")
            yield obj[key], len(line)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def write_dataset(
    documents: Iterable[tuple[str, int]],
    output_prefix: Union[str, Path],
    tokenizer: Tokenizer,
    sources: list[str],
    total_bytes: int,
    progress: bool = True,
    desc: str = "preprocess",
) -> PreprocessResult:
    """Tokenize `documents` ((text, input bytes) pairs) into PREFIX.bin/.idx/.meta.json, atomically."""
    prefix = str(output_prefix)
    if prefix.endswith((".bin", ".idx")):
        raise DataError(f"{prefix}: give the output prefix, without .bin/.idx")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    final = [prefix + ".bin", prefix + ".idx", meta_path(prefix)]
    temporary = [f"{path}.tmp{os.getpid()}" for path in final]
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(temporary[0], dtype=dtype)
    n_docs = n_tokens = skipped = 0
    max_id = -1
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=None if progress else True)

    def flush(batch: list[str]) -> None:
        nonlocal n_docs, n_tokens, max_id
        for ids in tokenizer.encode_batch(batch):
            doc = np.empty(len(ids) + 1, dtype=np.int64)
            doc[:-1] = ids
            doc[-1] = tokenizer.eod
            max_id = max(max_id, int(doc.max()))
            builder.add_item(torch.from_numpy(doc))
            builder.end_document()
            n_docs += 1
            n_tokens += len(doc)
        if max_id >= tokenizer.vocab_size:
            raise DataError(
                f"tokenizer {tokenizer.name!r} produced id {max_id} >= its vocab_size {tokenizer.vocab_size}"
            )
        batch.clear()

    try:
        batch: list[str] = []
        chars = 0
        for text, consumed in documents:
            bar.update(consumed)
            if not text.strip():
                skipped += 1
                continue
            batch.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                flush(batch)
                chars = 0
        flush(batch)
        builder.finalize(temporary[1])
        if n_docs == 0:
            shown = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
            raise DataError(f"{shown}: no documents to write (every input is empty or whitespace)")
        write_meta(
            temporary[2],
            tokenizer,
            documents=n_docs,
            tokens=n_tokens,
            max_token_id=max_id,
            sources=sources,
            skipped_empty=skipped,
        )
        for src, dst in zip(temporary, final):
            os.replace(src, dst)
    except BaseException:
        builder.data_file.close()
        for path in temporary:
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        bar.close()
    return PreprocessResult(prefix=prefix, documents=n_docs, tokens=n_tokens, skipped_empty=skipped)


def preprocess(
    inputs: Sequence[Union[str, Path]],
    output_prefix: Union[str, Path],
    tokenizer: Union[str, Tokenizer],
    jsonl_key: str = "text",
    txt_mode: str = "file",
    progress: bool = True,
) -> PreprocessResult:
    """Tokenize .txt/.jsonl files (or directories of them) into the indexed dataset `output_prefix`."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"preprocess: txt_mode {txt_mode!r} is not one of {', '.join(map(repr, TXT_MODES))}")
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    files = find_inputs(inputs)
    documents = (doc for path in files for doc in read_documents(path, jsonl_key, txt_mode))
    return write_dataset(
        documents,
        output_prefix,
        tok,
        sources=[str(p.resolve()) for p in files],
        total_bytes=sum(p.stat().st_size for p in files),
        progress=progress,
    )
