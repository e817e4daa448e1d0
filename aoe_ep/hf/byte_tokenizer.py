"""aoe-ep's byte tokenizer (ids 0..255 = the UTF-8 bytes, 256 = end of document) as a Hugging Face fast tokenizer.

Built from the `tokenizers` library's own parts: the byte-level pre-tokenizer (no regex split, no prefix space) maps
each byte of the text to one printable symbol; a BPE model with no merges, whose vocabulary is those 256 symbols (the
symbol of byte b at id b), gives each symbol its id; the byte-level decoder maps the symbols back to bytes. The
end-of-document token is a special token at id 256. Text that happens to spell it is encoded as its bytes, as the
byte tokenizer does (`encode_special_tokens` on the object, `split_special_tokens` in `tokenizer_config.json`).
There is no post-processor, so no start or end token is ever added; padding uses the end-of-document token, as the
exported `generation_config.json` does. `transformers.AutoTokenizer.from_pretrained(directory)` loads it as a fast
tokenizer (no remote code).
"""

from __future__ import annotations

import json
from pathlib import Path

from aoe_ep.data.tokenizer import ByteTokenizer

EOD_TOKEN = "<|endoftext|>"  # id 256; aoe_ep.data.tokenizer.EOD_TOKENS finds it when the file is read as a .json


def byte_symbols() -> list[str]:
    """The printable symbol of each byte 0..255, in byte order (the byte-level pre-tokenizer's alphabet): a byte
    that is a printable Latin-1 character other than space and the soft hyphen stands for itself, every other byte
    for the next code point from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    symbols, extra = [], 256
    for byte in range(256):
        if byte in kept:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(extra))
            extra += 1
    return symbols


def byte_hf_tokenizer():
    """The `tokenizers.Tokenizer` whose ids equal `ByteTokenizer`'s on any text and whose decode inverts them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    eod = ByteTokenizer().eod
    vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    if tokenizer.token_to_id(EOD_TOKEN) != eod:
        raise RuntimeError(f"the byte tokenizer's {EOD_TOKEN} got id {tokenizer.token_to_id(EOD_TOKEN)}, not {eod}")
    tokenizer.encode_special_tokens = True  # not saved in tokenizer.json: `split_special_tokens` says it there
    return tokenizer


def write_byte_tokenizer(out: Path, max_len: int) -> None:
    """`tokenizer.json` and `tokenizer_config.json` of the byte tokenizer into the directory `out`."""
    byte_hf_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "eos_token": EOD_TOKEN,
        "pad_token": EOD_TOKEN,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
