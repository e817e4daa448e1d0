import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from aoe_ep.cli import main
from aoe_ep.data import DataError, build_tokenizer, preprocess
from aoe_ep.data.preprocessing import write_dataset
from tests.data.conftest import write_jsonl

EOD = 256


def stored(prefix: str) -> list[list[int]]:
    """The documents of a dataset as megatron-core reads them."""
    ds = IndexedDataset(prefix)
    assert np.array_equal(ds.document_indices, np.arange(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def byte_doc(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [EOD]


def test_txt_is_one_document_per_file_and_jsonl_one_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nstill the first file\n")
    write_jsonl(tmp_path / "b.jsonl", ["línea uno", "line two"])
    result = preprocess([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out" / "ds", "byte", progress=False)
    docs = ["first file\n\nstill the first file\n", "línea uno", "line two"]
    assert stored(result.prefix) == [byte_doc(d) for d in docs]
    assert (result.documents, result.tokens) == (3, sum(len(byte_doc(d)) for d in docs))

    meta = json.loads(open(result.prefix + ".meta.json").read())
    assert meta["tokenizer"]["name"] == "byte" and meta["tokenizer"]["vocab_size"] == 257
    assert meta["tokenizer"]["unique_identifiers"] == {"class": "ByteTokenizer", "vocab_size": 257, "eod": 256}
    assert (meta["documents"], meta["tokens"], meta["max_token_id"]) == (3, result.tokens, EOD)


def test_paragraph_mode_splits_txt_on_blank_lines(tmp_path):
    (tmp_path / "book.txt").write_text("one\nstill one\n\ntwo\n \n\nthree\n")
    result = preprocess([tmp_path / "book.txt"], tmp_path / "ds", "byte", txt_mode="paragraph", progress=False)
    assert stored(result.prefix) == [byte_doc("one\nstill one"), byte_doc("two"), byte_doc("three")]


def test_directories_are_searched_recursively_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "in" / "b" / "x.jsonl", ["bx"])
    write_jsonl(tmp_path / "in" / "a.jsonl", ["a"])
    (tmp_path / "in" / "b" / "c.txt").write_text("bc")
    (tmp_path / "in" / "notes.md").write_text("ignored")
    result = preprocess([tmp_path / "in"], tmp_path / "ds", "byte", progress=False)
    assert stored(result.prefix) == [byte_doc("a"), byte_doc("bc"), byte_doc("bx")]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", ["x", "", "  \n", "y"])
    with open(source, "a") as f:
        f.write("\n")  # a blank line
    result = preprocess([source], tmp_path / "ds", "byte", progress=False)
    assert stored(result.prefix) == [byte_doc("x"), byte_doc("y")]
    assert result.skipped_empty == 3


def test_tokens_match_the_tokenizers_library(tmp_path, hf_json):
    import tokenizers

    reference = tokenizers.Tokenizer.from_file(hf_json)
    docs = ["the quick brown fox", "naïve café ☕"]
    result = preprocess([write_jsonl(tmp_path / "s.jsonl", docs)], tmp_path / "ds", hf_json, progress=False)
    eod = reference.token_to_id("<|endoftext|>")
    assert stored(result.prefix) == [reference.encode(d, add_special_tokens=False).ids + [eod] for d in docs]
    meta = json.loads(open(result.prefix + ".meta.json").read())
    assert meta["tokenizer"]["unique_identifiers"] == dict(build_tokenizer(hf_json).unique_identifiers)


def test_interrupted_run_keeps_the_previous_dataset_and_no_temporary_files(tmp_path):
    prefix = preprocess(
        [write_jsonl(tmp_path / "s.jsonl", ["old"])], tmp_path / "out" / "ds", "byte", progress=False
    ).prefix
    before = {name: open(prefix + name, "rb").read() for name in (".bin", ".idx", ".meta.json")}

    def documents():
        yield "new document", 12
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(documents(), prefix, build_tokenizer("byte"), sources=[], total_bytes=12, progress=False)
    assert {name: open(prefix + name, "rb").read() for name in before} == before
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.meta.json"]


def test_empty_input_is_a_data_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(DataError, match=r"empty\.txt: no documents to write"):
        preprocess([tmp_path / "empty.txt"], tmp_path / "out" / "ds", "byte", progress=False)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"s\.jsonl:2: not valid JSON"),
        ('{"body": "x"}', r"s\.jsonl:2: no 'text' field \(found 'body'\); choose the field with --jsonl-key"),
        ('["text"]', r"s\.jsonl:2: no 'text' field \(found a JSON list\)"),
        ('{"text": 3}', r"s\.jsonl:2: field 'text' holds int, not a string"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        preprocess([tmp_path / "s.jsonl"], tmp_path / "ds", "byte", progress=False)


def test_jsonl_key_picks_the_field(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"body": "x", "text": 1}\n')
    result = preprocess([tmp_path / "s.jsonl"], tmp_path / "ds", "byte", jsonl_key="body", progress=False)
    assert stored(result.prefix) == [byte_doc("x")]


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty_dir").mkdir()
    cases = [
        ([tmp_path / "missing.txt"], r"missing\.txt: no such file or directory"),
        ([tmp_path / "data.csv"], r"data\.csv: unsupported input type '\.csv'"),
        ([tmp_path / "latin1.txt"], r"latin1\.txt: not UTF-8 text"),
        ([tmp_path / "empty_dir"], r"empty_dir: the directory holds no \.txt or \.jsonl files"),
        ([], "no input files"),
    ]
    for inputs, message in cases:
        with pytest.raises(DataError, match=message):
            preprocess(inputs, tmp_path / "ds", "byte", progress=False)


def test_cli_preprocess(tmp_path, capsys):
    source = write_jsonl(tmp_path / "s.jsonl", ["ab", "c"])
    assert main(["preprocess", "--input", source, "--output-prefix", str(tmp_path / "ds"), "--tokenizer", "byte"]) == 0
    assert "2 documents, 5 tokens" in capsys.readouterr().out
    assert stored(str(tmp_path / "ds")) == [byte_doc("ab"), byte_doc("c")]


def test_cli_data_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert main(["preprocess", "--input", missing, "--output-prefix", str(tmp_path / "ds")]) == 2
    assert capsys.readouterr().err == f"aoe-ep: data error: {missing}: no such file or directory\n"
