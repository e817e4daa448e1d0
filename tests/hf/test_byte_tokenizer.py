"""The byte tokenizer as a Hugging Face tokenizer (aoe_ep/hf/byte_tokenizer.py): the same ids as `ByteTokenizer` on
any text, a decode that inverts them, loaded by `AutoTokenizer` as a fast tokenizer without remote code."""

from __future__ import annotations

import json

import pytest

from aoe_ep.data.tokenizer import ByteTokenizer, build_tokenizer
from aoe_ep.hf.byte_tokenizer import EOD_TOKEN, byte_hf_tokenizer, byte_symbols, write_byte_tokenizer

TEXTS = [
    "",
    " ",
    "x",
    "  two leading spaces, two trailing  ",
    "for i in range(10):\n    print(i)\n",
    "tabs\tand\r\nwindows\nnewlines\n\n",
    "héllo wörld, naïve café — “quotes” ‘too’",
    "日本語のテキスト，한국어 텍스트, Ελληνικά, русский",
    "emoji 😀👍🏽 and a ZWJ family 👨‍👩‍👧",
    "\x00\x01\x1f\x7f control bytes \u0085\u00a0\u00ad",
    "Ā Ġ Ċ ł: the byte-level symbols themselves",
    f"text that spells {EOD_TOKEN} and <|endoftext|>twice",
    "".join(map(chr, range(32, 1200))),
]


def test_symbols_are_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    symbols = byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_the_byte_tokenizer_and_decode_inverts_them(text):
    ours = ByteTokenizer()
    theirs = byte_hf_tokenizer()
    ids = theirs.encode(text, add_special_tokens=True).ids
    assert ids == ours.encode(text) == list(text.encode("utf-8"))
    assert theirs.decode(ids) == text == ours.decode(ids)


def test_auto_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    write_byte_tokenizer(tmp_path, 48)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and not list(tmp_path.glob("*.py"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.is_fast
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (256, 256, None)
    assert len(tok) == ByteTokenizer().vocab_size and tok.model_max_length == 48
    ours = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ours.encode(text) and tok(text)["input_ids"] == ids
        assert tok.decode(ids) == text
        assert tok.decode([*ids, ours.eod], skip_special_tokens=True) == text
    assert tok.decode([104, ours.eod, 105]) == f"h{EOD_TOKEN}i"
    batch = tok(["ab", "abcd"], padding="longest")["input_ids"]
    assert batch == [[97, 98, 256, 256], [97, 98, 99, 100]]


def test_the_file_read_as_a_tokenizers_json_is_the_byte_tokenizer_too(tmp_path):
    """As aoe-ep's own `.json` tokenizer (`--tokenizer hf/tokenizer.json`): the same ids and end-of-document id
    (a text spelling the end-of-document token aside: a plain tokenizers file always matches special tokens)."""
    write_byte_tokenizer(tmp_path, 48)
    tok = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.vocab_size, tok.eod) == (257, 256)
    for text in (t for t in TEXTS if EOD_TOKEN not in t):
        assert tok.encode(text) == ByteTokenizer().encode(text)
        assert tok.decode([*tok.encode(text), tok.eod]) == text
