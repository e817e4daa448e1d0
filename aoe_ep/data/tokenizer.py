"""Tokenizers: the built-in byte-level one, a Hugging Face `tokenizers` JSON file, or a sentencepiece `.model`.

Each gives what megatron-core's GPTDataset and the trainer read — `vocab_size`, `eod`, `unique_identifiers` — plus
`encode`/`decode` and a stable `name`. `unique_identifiers` names the tokenizer by its class and the SHA-256 of its
file, not by its path, so a moved tokenizer file still matches the datasets and caches made with it.

The end-of-document id (`eod`, appended after every document) is the tokenizer's own end token when it has one
(`<|endoftext|>`, `</s>`, ... for JSON files; `eos_id()` for sentencepiece, id 2 in the Llama vocabulary); otherwise
it is one extra id, `vocab_size - 1`, after the tokenizer's own ids. `decode` drops it (and other special tokens).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from aoe_ep.data.errors import DataError
from aoe_ep.hashing import file_sha256

# End-of-document tokens of common vocabularies, in the order they are looked for in a tokenizers JSON file.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<eod>", "[EOS]", "<|eos|>")


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer. Ids lie in [0, vocab_size); `eod` ends every document."""

    name: str
    vocab_size: int
    eod: int
    unique_identifiers: OrderedDict

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any added start or end token."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text; backends that can, do it in parallel."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, dropping `eod` and other special tokens."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text (ids 0..255) and one end-of-document id, 256: 257 ids, no files."""

    def __init__(self) -> None:
        self.name = "byte"
        self.vocab_size = 257
        self.eod = 256
        self.unique_identifiers = OrderedDict(
            [("class", "ByteTokenizer"), ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte tokenizer's ids [0, {self.vocab_size})")
        return bytes(i for i in ids if i != self.eod).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` JSON file (`tokenizer.json`), as saved by `Tokenizer.save` or shipped with HF models."""

    def __init__(self, path: Path) -> None:
        tokenizers = _import_optional("tokenizers", path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for any parse failure
            raise DataError(f"{path}: not a Hugging Face tokenizers JSON file: {err}") from None
        own_size = self._tok.get_vocab_size(with_added_tokens=True)
        own_eod = next((i for i in map(self._tok.token_to_id, EOD_TOKENS) if i is not None), None)
        self.vocab_size = own_size if own_eod is not None else own_size + 1
        self.eod = own_eod if own_eod is not None else own_size
        self._own_size = own_size
        digest = file_sha256(path).hex()
        self.name = f"hf:{path.name}@{digest[:12]}"
        self.unique_identifiers = OrderedDict(
            [("class", "HuggingFaceTokenizer"), ("sha256", digest), ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) < self._own_size], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file, e.g. the Llama 32,000-piece `tokenizer.model` (eod = its `</s>`, id 2)."""

    def __init__(self, path: Path) -> None:
        spm = _import_optional("sentencepiece", path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise DataError(f"{path}: not a sentencepiece model file: {err}") from None
        own_size = self._sp.get_piece_size()
        own_eod = self._sp.eos_id()
        self.vocab_size = own_size if own_eod >= 0 else own_size + 1
        self.eod = own_eod if own_eod >= 0 else own_size
        self._own_size = own_size
        digest = file_sha256(path).hex()
        self.name = f"sentencepiece:{path.name}@{digest[:12]}"
        self.unique_identifiers = OrderedDict(
            [
                ("class", "SentencePieceTokenizer"),
                ("sha256", digest),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
            ]
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))  # a list is encoded on all cores

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) < self._own_size and int(i) != self.eod])


def build_tokenizer(spec: str) -> Tokenizer:
    """`"byte"`, a path to a Hugging Face tokenizers `.json` file, or a path to a sentencepiece `.model` file."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data.tokenizer: expected 'byte' or a tokenizer file path, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.suffix not in (".json", ".model"):
        raise DataError(
            f"data.tokenizer: {spec!r} is neither 'byte' nor a path to a tokenizers .json file or a "
            f"sentencepiece .model file"
        )
    if not path.is_file():
        raise DataError(
            f"{path}: not a regular file (data.tokenizer)"
            if path.exists()
            else f"{path}: tokenizer file not found (data.tokenizer)"
        )
    return HuggingFaceTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)


def _import_optional(module: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading this tokenizer needs the `{module}` package: pip install {module}") from None
