import json
import math
import os
import pickle
import random
import string
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from aoe_ep.config import DataConfig
from aoe_ep.data import DataError, build_datasets, build_tokenizer

EOD = 256
BYTE = build_tokenizer("byte")


def config(tmp_path, paths, **kw) -> DataConfig:
    kw.setdefault("split", "100,0,0")
    kw.setdefault("seq_len", 16)
    return DataConfig(paths=list(paths), cache_dir=str(tmp_path / "cache"), **kw)


def window(item) -> list[int]:
    """The seq_len + 1 tokens an item covers: its inputs, then the last label."""
    assert item["tokens"].dtype == item["labels"].dtype == torch.long
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels are the next tokens
    return item["tokens"].tolist() + [int(item["labels"][-1])]


def random_docs(n: int, seed: int, letters: str = string.ascii_lowercase) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def consistent_with(win: list[int], docs: list[list[int]], eod: int = EOD) -> bool:
    """The window is a slice of some concatenation of whole documents, each followed by eod."""
    parts, current = [], []
    for t in win:
        if t == eod:
            parts.append(current)
            current = []
        else:
            current.append(t)
    parts.append(current)
    if len(parts) == 1:
        return any(_contains(d, parts[0]) for d in docs)
    head, *middle, tail = parts
    return (
        any(d[len(d) - len(head) :] == head for d in docs if len(d) >= len(head))
        and all(m in docs for m in middle)
        and any(d[: len(tail)] == tail for d in docs)
    )


def _contains(doc: list[int], piece: list[int]) -> bool:
    return any(doc[i : i + len(piece)] == piece for i in range(len(doc) - len(piece) + 1))


def test_one_document_gives_exactly_the_windows_of_its_token_stream(tmp_path, make_dataset):
    text = "".join(string.ascii_letters[i % 52] for i in range(101))
    prefix = make_dataset("one", [text])
    train, valid = build_datasets(config(tmp_path, [prefix]), BYTE, train_samples=20, valid_samples=0, seed=3)
    assert valid is None
    epoch = list(text.encode()) + [EOD]  # 102 tokens; every epoch repeats the one document
    stream = epoch * math.ceil((20 * 16 + 1) / len(epoch))
    expected = sorted(stream[j * 16 : j * 16 + 17] for j in range((len(stream) - 1) // 16))
    assert len(train) == len(expected) >= 20
    assert sorted(window(train[i]) for i in range(len(train))) == expected
    item = train[0]
    assert item["loss_mask"].dtype == torch.float32 and torch.equal(item["loss_mask"], torch.ones(16))
    assert item["tokens"].shape == item["labels"].shape == (16,)


@pytest.mark.parametrize("spec", ["byte", "hf_json", "sp_model"])
def test_items_are_slices_of_the_directly_tokenized_documents(tmp_path, make_dataset, request, spec):
    tok = BYTE if spec == "byte" else build_tokenizer(request.getfixturevalue(spec))
    docs = random_docs(60, seed=0) + ["ünïcödé ☕ " * 3]
    prefix = make_dataset(spec, docs, tok)
    train, _ = build_datasets(config(tmp_path, [prefix], seq_len=24), tok, train_samples=50, valid_samples=0, seed=1)
    encoded = [tok.encode(d) for d in docs]  # the tokenizer called directly, document by document
    assert all(consistent_with(window(train[i]), encoded, tok.eod) for i in range(50))
    assert window(pickle.loads(pickle.dumps(train))[7]) == window(train[7])  # as DataLoader workers get it


def test_items_depend_only_on_seed_and_index(tmp_path, make_dataset):
    prefix = make_dataset("d", random_docs(200, seed=1))
    first, _ = build_datasets(config(tmp_path / "a", [prefix]), BYTE, train_samples=64, valid_samples=0, seed=7)
    again, _ = build_datasets(config(tmp_path / "a", [prefix]), BYTE, train_samples=64, valid_samples=0, seed=7)
    fresh, _ = build_datasets(config(tmp_path / "b", [prefix]), BYTE, train_samples=64, valid_samples=0, seed=7)
    other, _ = build_datasets(config(tmp_path / "c", [prefix]), BYTE, train_samples=64, valid_samples=0, seed=8)
    order = list(range(64))
    random.Random(0).shuffle(order)
    reference = [window(first[i]) for i in range(64)]
    assert [window(again[i]) for i in range(64)] == reference  # from the cached indices
    assert {i: window(fresh[i]) for i in order} == dict(enumerate(reference))  # rebuilt, read in another order
    assert [window(other[i]) for i in range(64)] != reference
    assert sorted(os.listdir(tmp_path / "a" / "cache")) == ["megatron_indices"]


def test_a_larger_request_within_the_same_epoch_keeps_the_items(tmp_path, make_dataset):
    prefix = make_dataset("d", random_docs(200, seed=1))  # about 4,500 tokens: 280 samples of 16 per epoch
    small, _ = build_datasets(config(tmp_path, [prefix]), BYTE, train_samples=10, valid_samples=0, seed=7)
    large, _ = build_datasets(config(tmp_path, [prefix]), BYTE, train_samples=250, valid_samples=0, seed=7)
    assert len(small) == len(large) > 250  # one epoch each
    assert [window(large[i]) for i in range(10)] == [window(small[i]) for i in range(10)]


def test_split_puts_later_documents_in_valid(tmp_path, make_dataset):
    prefix = make_dataset("ab", random_docs(50, seed=2, letters="a") + random_docs(50, seed=3, letters="b"))
    train, valid = build_datasets(
        config(tmp_path, [prefix], split="50,50,0"), BYTE, train_samples=30, valid_samples=10, seed=0
    )
    assert len(valid) >= 10
    assert set().union(*(window(train[i]) for i in range(len(train)))) == {ord("a"), EOD}
    assert set().union(*(window(valid[i]) for i in range(len(valid)))) == {ord("b"), EOD}


def test_blend_follows_weights(tmp_path, make_dataset):
    a = make_dataset("a", random_docs(40, seed=4, letters="a"))
    b = make_dataset("b", random_docs(40, seed=5, letters="b"))
    train, _ = build_datasets(
        config(tmp_path, [a, b], weights=[1, 3]), BYTE, train_samples=400, valid_samples=0, seed=0
    )
    items = [train[i] for i in range(400)]
    ids = [int(item["dataset_id"]) for item in items]
    assert abs(ids.count(0) - 100) <= 1
    for dataset_id, item in zip(ids, items):
        assert set(window(item)) <= {ord("ab"[dataset_id]), EOD}


def test_blend_without_weights_follows_dataset_sizes(tmp_path, make_dataset):
    small = make_dataset("small", ["a" * 99] * 10)  # 1,000 tokens
    large = make_dataset("large", ["b" * 99] * 30)  # 3,000 tokens
    train, _ = build_datasets(config(tmp_path, [small, large]), BYTE, train_samples=200, valid_samples=0, seed=0)
    ids = [int(train[i]["dataset_id"]) for i in range(200)]
    assert abs(ids.count(0) - 50) <= 1


def test_zero_weight_leaves_a_path_out(tmp_path, make_dataset):
    a = make_dataset("a", ["a" * 50] * 4)
    b = make_dataset("b", ["b" * 50] * 4)
    train, _ = build_datasets(config(tmp_path, [a, b], weights=[0, 2]), BYTE, train_samples=8, valid_samples=0, seed=0)
    assert set(window(train[0])) <= {ord("b"), EOD}


def test_default_corpus_is_the_stdlib_built_once_and_reused(tmp_path, monkeypatch):
    import sysconfig

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from aoe_ep.data import default_corpus

    cfg = config(tmp_path, [], split="80,20,0", default_corpus_max_bytes=300_000)
    train, valid = build_datasets(cfg, BYTE, train_samples=100, valid_samples=10, seed=0)
    assert len(train) >= 100 and len(valid) >= 10
    (corpus,) = [str(p)[:-4] for p in (tmp_path / "cache" / "default_corpus").iterdir() if p.suffix == ".bin"]
    meta = json.loads(open(corpus + ".meta.json").read())
    sources = meta["sources"]
    stdlib = sysconfig.get_paths()["stdlib"]
    assert all(s.startswith(stdlib) and s.endswith(".py") and "site-packages" not in s for s in sources)
    assert sources == sorted(sources, key=lambda s: os.path.relpath(s, stdlib))
    assert sum(os.path.getsize(s) for s in sources) <= 300_000
    first = open(sources[0], "rb").read()
    stored = IndexedDataset(corpus)  # kept in a name: its __del__ unmaps the memory its items view
    assert stored[0].tolist() == list(first) + [EOD]

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the default corpus was tokenized again")

    monkeypatch.setattr(default_corpus, "write_dataset", must_not_rebuild)
    again, _ = build_datasets(cfg, BYTE, train_samples=100, valid_samples=10, seed=0)
    assert window(again[5]) == window(train[5])


def test_other_ranks_wait_for_rank_0_then_only_read(tmp_path, monkeypatch):
    from aoe_ep.data import default_corpus

    rank, seen_at_barrier = 0, []

    def barrier(*args, **kwargs):
        seen_at_barrier.append(sorted(os.listdir(tmp_path)) if tmp_path.exists() else [])

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: rank)
    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    build = lambda: default_corpus.default_corpus_prefix(str(tmp_path / "cache"), BYTE, 50_000)  # noqa: E731

    rank = 1  # before rank 0 has written anything: waits, then finds nothing and says why
    with pytest.raises(DataError, match="not built by rank 0 .*filesystem all ranks share"):
        build()
    rank = 0
    prefix = build()
    assert seen_at_barrier == [[], ["cache"]]  # rank 0 reached the barrier after writing the corpus
    monkeypatch.setattr(default_corpus, "write_dataset", None)  # the other ranks only read
    rank = 1
    assert build() == prefix


@pytest.fixture
def one_rank_process_group(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_same_items_under_torch_distributed(tmp_path, make_dataset, request):
    """With a process group megatron-core caches the blend's indices itself; the items are the same as without."""
    paths = [make_dataset("a", random_docs(30, seed=6)), make_dataset("b", random_docs(30, seed=7))]
    alone, _ = build_datasets(config(tmp_path / "alone", paths, weights=[1, 2]), BYTE, 60, 0, seed=2)
    request.getfixturevalue("one_rank_process_group")
    grouped, _ = build_datasets(config(tmp_path / "group", paths, weights=[1, 2]), BYTE, 60, 0, seed=2)
    assert [window(grouped[i]) for i in range(60)] == [window(alone[i]) for i in range(60)]
    cached = os.listdir(tmp_path / "group" / "cache" / "megatron_indices")
    assert any("BlendedDataset" in name for name in cached)
    assert not any("BlendedDataset" in name for name in os.listdir(tmp_path / "alone" / "cache" / "megatron_indices"))


# --- errors: one DataError naming the file, before megatron-core sees it -------------------------------------------


def test_missing_files_are_named(tmp_path, make_dataset):
    prefix = make_dataset("d", ["abc"] * 4)
    cfg = config(tmp_path, [prefix])
    with pytest.raises(DataError, match=r"nowhere: no dataset here \(.*nowhere\.bin and .*nowhere\.idx do not"):
        build_datasets(config(tmp_path, [str(tmp_path / "nowhere")]), BYTE, 4, 0, 0)
    with pytest.raises(DataError, match="without .bin/.idx"):
        build_datasets(config(tmp_path, [prefix + ".bin"]), BYTE, 4, 0, 0)
    os.rename(prefix + ".idx", prefix + ".idx.away")
    with pytest.raises(DataError, match=rf"{prefix}\.idx is missing \(its pair {prefix}\.bin exists\)"):
        build_datasets(cfg, BYTE, 4, 0, 0)
    os.rename(prefix + ".idx.away", prefix + ".idx")
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=rf"{prefix}\.bin is missing"):
        build_datasets(cfg, BYTE, 4, 0, 0)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _truncate(p + ".bin", 2), r"d\.bin is truncated or corrupt: .*d\.idx describes 44 tokens of uint16"),
        (lambda p: _truncate(p + ".idx", 8), r"d\.idx is truncated or corrupt: its header promises 4 sequences"),
        (lambda p: _truncate(p + ".idx", 10_000), r"d\.idx is truncated: 0 bytes"),
        (lambda p: _overwrite(p + ".idx", 0, b"XX"), r"d\.idx is not a megatron-core index file"),
        (lambda p: _overwrite(p + ".idx", 34, b"\x07"), r"d\.idx is corrupt: its byte offsets"),
    ],
)
def test_corrupt_files_are_named(tmp_path, make_dataset, damage, message):
    prefix = make_dataset("d", ["0123456789"] * 4)
    damage(prefix)
    with pytest.raises(DataError, match=message):
        build_datasets(config(tmp_path, [prefix]), BYTE, 4, 0, 0)


def _truncate(path: str, by: int) -> None:
    os.truncate(path, max(0, os.path.getsize(path) - by))


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_data_of_another_tokenizer_is_refused(tmp_path, make_dataset, hf_json):
    prefix = make_dataset("hf", ["the quick brown fox"] * 4, hf_json)
    with pytest.raises(
        DataError,
        match=rf"{prefix}\.bin was tokenized with 'hf:bpe\.json@.*' \(vocab_size 300, "
        rf"per .*hf\.meta\.json\) but data\.tokenizer is 'byte'",
    ):
        build_datasets(config(tmp_path, [prefix]), BYTE, 4, 0, 0)


def test_edited_or_stale_sidecar_is_refused(tmp_path, make_dataset):
    prefix = make_dataset("d", ["abc"] * 4)
    meta = json.loads(open(prefix + ".meta.json").read())
    meta["tokens"] += 1
    open(prefix + ".meta.json", "w").write(json.dumps(meta))
    with pytest.raises(DataError, match=r"d\.meta\.json records 17 tokens but .*d\.bin holds 16"):
        build_datasets(config(tmp_path, [prefix]), BYTE, 4, 0, 0)
    meta["tokenizer"]["unique_identifiers"]["vocab_size"] = 32000
    open(prefix + ".meta.json", "w").write(json.dumps(meta))
    with pytest.raises(DataError, match=r"d\.bin was tokenized with"):
        build_datasets(config(tmp_path, [prefix]), BYTE, 4, 0, 0)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    prefix = str(tmp_path / "foreign")  # as megatron's own preprocess_data.py writes it: no sidecar
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(32000))
    for doc in ([5, 6, 7, 2], [300, 8, 2]):
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(
        DataError,
        match=r"foreign\.bin holds token id 300, outside the vocabulary of data\.tokenizer "
        r"'byte' \(vocab_size 257\)",
    ):
        build_datasets(config(tmp_path, [prefix]), BYTE, 4, 0, 0)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0], "1 weights for 2 paths"),
        ([1.0, -1.0], r"the weight of .*b must be a finite number >= 0, got -1\.0"),
        ([1.0, float("nan")], r"the weight of .*b must be a finite number >= 0, got nan"),
        ([0, 0], r"all weights are 0"),
        ([1.0, "x"], r"the weight of .*b must be a finite number >= 0, got 'x'"),
    ],
)
def test_bad_weights(tmp_path, make_dataset, weights, message):
    paths = [make_dataset("a", ["abc"] * 4), make_dataset("b", ["abc"] * 4)]
    with pytest.raises(DataError, match=rf"data\.weights: {message}"):
        build_datasets(config(tmp_path, paths, weights=weights), BYTE, 4, 0, 0)


def test_bad_paths_and_sizes(tmp_path, make_dataset):
    with pytest.raises(DataError, match=r"data\.paths: must be a list of dataset prefixes"):
        build_datasets(DataConfig(paths=[3], cache_dir=str(tmp_path)), BYTE, 4, 0, 0)
    with pytest.raises(DataError, match="train_samples must be a non-negative integer"):
        build_datasets(config(tmp_path, [make_dataset("d", ["abc"])]), BYTE, -1, 0, 0)


def test_split_without_documents_for_valid_is_refused(tmp_path, make_dataset):
    prefix = make_dataset("d", ["one long document " * 20])
    with pytest.raises(
        DataError,
        match=r"d: data.split '98,2,0' leaves the valid part no documents \(it has 1 "
        r"documents\); .*--txt-mode paragraph",
    ):
        build_datasets(config(tmp_path, [prefix], split="98,2,0"), BYTE, 4, 4, 0)
    train, valid = build_datasets(config(tmp_path, [prefix], split="98,2,0"), BYTE, 4, 0, 0)
    assert valid is None and len(train) >= 4  # nothing asked of valid: it is not built


def test_helpers_that_cannot_be_built_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "megatron.core.datasets.helpers", raising=False)
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)  # as if the wheel lacked it
    monkeypatch.setitem(sys.modules, "pybind11", None)
    from aoe_ep.data.cpp_helpers import ensure_megatron_helpers

    with pytest.raises(DataError, match=r"helpers\.cpp: building megatron-core's dataset helpers .* needs pybind11"):
        ensure_megatron_helpers(str(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("default_corpus_max_bytes", 0, "must be a positive integer"),
        ("split", "0,1,0", "gives the train part no weight"),
        ("tokenizer", "", "must be 'byte' or a tokenizer file path"),
        ("cache_dir", "", "must be a directory path"),
    ],
)
def test_data_config_fields_are_validated(field, value, message):
    from aoe_ep.config import ConfigError

    with pytest.raises(ConfigError, match=rf"data\.{field}: {message}"):
        DataConfig(**{field: value}).validate()


def test_the_held_out_files_are_never_in_the_default_corpus(tmp_path):
    """The fewest last files that hold 64 KiB are left out at any cap; `aoe-ep router-free`'s default text is
    exactly their first 64 KiB, last file first."""
    from aoe_ep.analysis.router_free import read_text_ids
    from aoe_ep.data import default_corpus

    root = tmp_path / "lib"
    sizes = {f"m{i:02d}.py": 10_000 + 1_000 * i for i in range(20)}  # 20 files, 390 KB
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n".ljust(size, "x"))
    names = sorted(sizes)
    corpus = [rel for rel, _ in default_corpus.stdlib_sources(10**12, root)]
    held_out = names[len(corpus) :]
    assert corpus == names[: len(corpus)] and held_out == ["m17.py", "m18.py", "m19.py"]
    assert sum(sizes[n] for n in held_out) >= default_corpus.HELD_OUT_BYTES > sum(sizes[n] for n in held_out[1:])
    assert [rel for rel, _ in default_corpus.stdlib_sources(50_000, root)] == names[:4]  # a cap below takes the first

    stdlib = default_corpus.library_sources()
    start = default_corpus.held_out_start(stdlib)
    lib = Path(sysconfig.get_paths()["stdlib"])
    held_out_bytes = b"".join((lib / rel).read_bytes() for rel, _ in reversed(stdlib[start:]))
    want = BYTE.encode(held_out_bytes[: default_corpus.HELD_OUT_BYTES].decode("utf-8", errors="ignore"))
    assert read_text_ids(None, BYTE, default_corpus.HELD_OUT_BYTES) == want
    assert {rel for rel, _ in default_corpus.stdlib_sources(10**12)}.isdisjoint(rel for rel, _ in stdlib[start:])
