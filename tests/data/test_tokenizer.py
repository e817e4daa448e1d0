import shutil
import sys

import pytest

from aoe_ep.data import DataError, build_tokenizer

SAMPLE = "Zebra  ünïcode → 漢字\n\tdef f(x):  return x ** 2  # done\n"


def test_byte_tokenizer_is_utf8_bytes_plus_eod():
    tok = build_tokenizer("byte")
    assert (tok.vocab_size, tok.eod, tok.name) == (257, 256, "byte")
    assert tok.encode(SAMPLE) == list(SAMPLE.encode("utf-8"))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.decode(tok.encode("ab") + [256] + tok.encode("c")) == "abc"  # eod is dropped
    assert list(tok.unique_identifiers.items()) == [("class", "ByteTokenizer"), ("vocab_size", 257), ("eod", 256)]
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])


def test_hf_tokenizer_round_trip_and_eod(hf_json):
    import tokenizers

    tok = build_tokenizer(hf_json)
    reference = tokenizers.Tokenizer.from_file(hf_json)
    assert tok.vocab_size == reference.get_vocab_size() == 300
    assert tok.eod == reference.token_to_id("<|endoftext|>") == 0
    assert tok.encode(SAMPLE) == reference.encode(SAMPLE, add_special_tokens=False).ids
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode_batch([SAMPLE, "fox"]) == [tok.encode(SAMPLE), tok.encode("fox")]
    assert tok.decode(tok.encode("fox") + [tok.eod]) == "fox"
    assert tok.name.startswith("hf:bpe.json@")


def test_hf_tokenizer_identity_follows_content_not_path(hf_json, tmp_path):
    moved = tmp_path / "renamed.json"
    shutil.copy(hf_json, moved)
    assert build_tokenizer(str(moved)).unique_identifiers == build_tokenizer(hf_json).unique_identifiers
    edited = tmp_path / "edited.json"
    edited.write_text(moved.read_text().replace('"<|endoftext|>"', '"<|other|>"'))
    assert build_tokenizer(str(edited)).unique_identifiers != build_tokenizer(hf_json).unique_identifiers


def test_hf_tokenizer_without_end_token_gets_one_extra_id(hf_json, tmp_path):
    path = tmp_path / "no_eod.json"
    path.write_text(open(hf_json).read().replace('"<|endoftext|>"', '"<|pad|>"'))
    tok = build_tokenizer(str(path))
    assert (tok.vocab_size, tok.eod) == (301, 300)
    assert tok.decode(tok.encode("fox") + [tok.eod]) == "fox"


def test_sentencepiece_round_trip_and_eod(sp_model):
    import sentencepiece as spm

    tok = build_tokenizer(sp_model)
    reference = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.vocab_size == reference.get_piece_size()
    assert tok.eod == reference.eos_id() == 2
    assert tok.encode(SAMPLE) == reference.encode(SAMPLE)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode_batch([SAMPLE, "jugs"]) == [tok.encode(SAMPLE), tok.encode("jugs")]
    assert tok.decode(tok.encode("jugs") + [tok.eod]) == "jugs"
    assert tok.unique_identifiers["class"] == "SentencePieceTokenizer"
    assert tok.name.startswith("sentencepiece:tiny.model@")


@pytest.mark.parametrize("spec", ["", "bytes", "gpt2", "vocab.txt"])
def test_unknown_spec_is_a_data_error(spec):
    with pytest.raises(DataError, match="data.tokenizer"):
        build_tokenizer(spec)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.json: tokenizer file not found"):
        build_tokenizer(str(tmp_path / "nowhere.json"))


def test_corrupt_tokenizers_json_is_named(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not a Hugging Face tokenizers JSON file"):
        build_tokenizer(str(path))


def test_corrupt_sentencepiece_model_is_named(tmp_path):
    pytest.importorskip("sentencepiece")
    path = tmp_path / "bad.model"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"bad\.model: not a sentencepiece model file"):
        build_tokenizer(str(path))


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "tok.model"
    path.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
    with pytest.raises(DataError, match=r"tok\.model: .*pip install sentencepiece"):
        build_tokenizer(str(path))
