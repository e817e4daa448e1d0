"""Every kind of model exported and loaded by transformers computes aoe-ep's logits (fp32, relative 1e-5) and
generates the same greedy tokens; stock formats need no remote code; what a format cannot express is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aoe_ep.eval.generate import SamplingConfig, generate
from aoe_ep.hf.errors import ConversionError
from aoe_ep.hf.export import choose_format, export_state
from tests.hf.conftest import KINDS, kind_config, random_model

STOCK = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def load_exported(out_dir, fmt: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(out_dir), trust_remote_code=fmt == "aoe_ep", dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_exported_model_equals_aoe_ep(kind, tmp_path):
    cfg = kind_config(kind)
    model = random_model(cfg)
    result = export_state(cfg, model.state_dict(), tmp_path / "hf")
    assert result.format == KINDS[kind][1]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    if result.format in STOCK:
        assert config["architectures"] == [STOCK[result.format]] and "auto_map" not in config
        assert not list((tmp_path / "hf").glob("*.py"))
    else:
        assert config["model_type"] == "aoe_ep"
        code = (tmp_path / "hf" / "modeling_aoe_ep.py").read_text()
        assert "import aoe_ep" not in code and "from aoe_ep" not in code
    hf = load_exported(tmp_path / "hf", result.format)
    assert type(hf).__name__ == STOCK.get(result.format, "AoeEpForCausalLM")

    tokens_BS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens_BS).logits, hf(tokens_BS).logits
    assert _relative(theirs, ours) < 1e-5

    prompt = tokens_BS[0, :12].tolist()
    new = generate(model, prompt, SamplingConfig(max_new_tokens=10))
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :].tolist()
    eod = 256
    assert out[: len(new)] == new and (len(new) == 10 or out[len(new)] == eod)


def test_kv_cache_generation_equals_full_recompute(tmp_path):
    cfg = kind_config("aoe_l2")
    export_state(cfg, random_model(cfg).state_dict(), tmp_path / "hf")
    hf = load_exported(tmp_path / "hf", "aoe_ep")
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    cached = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    full = hf.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_sharded_export_writes_an_index(tmp_path):
    cfg = kind_config("aoe_l2")
    model = random_model(cfg)
    export_state(cfg, model.state_dict(), tmp_path / "hf", max_shard_size=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = load_exported(tmp_path / "hf", "aoe_ep")
    tokens_BS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _relative(hf(tokens_BS).logits, model(tokens_BS).logits) < 1e-5


@pytest.mark.parametrize(
    "kind, fmt, setting",
    [
        ("aoe_l2", "mixtral", "moe.scorer='aoe'"),
        ("router_factorized", "mixtral", "moe.expert_kind='factorized'"),
        ("balance_bias", "mixtral", "moe.balance='bias'"),
        ("mixtral", "llama", "model.ffn='moe'"),
        ("dense", "aoe_ep", "model.ffn='dense'"),
    ],
)
def test_unexpressible_format_is_refused_naming_the_setting(kind, fmt, setting, tmp_path):
    cfg = kind_config(kind)
    with pytest.raises(ConversionError, match=setting.replace("(", r"\(")) as err:
        export_state(cfg, random_model(cfg).state_dict(), tmp_path / "hf", fmt=fmt)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_auto_format(tmp_path):
    assert choose_format(kind_config("mixtral")) == "mixtral"
    assert choose_format(kind_config("dense")) == "llama"
    assert choose_format(kind_config("mixtral"), "aoe_ep") == "aoe_ep"


def test_export_refuses_a_non_empty_destination(tmp_path):
    cfg = kind_config("mixtral")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an empty directory"):
        export_state(cfg, random_model(cfg).state_dict(), tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("fixture", ["hf_json", "sp_model"])
def test_tokenizer_files_travel_and_encode_the_same(fixture, request, tmp_path):
    from transformers import AutoTokenizer

    from aoe_ep.data import build_tokenizer
    from aoe_ep.hf.importer import import_hf

    spec = request.getfixturevalue(fixture)
    cfg = kind_config("mixtral", "model.vocab_size=301", f"data.tokenizer={spec}")
    export_state(cfg, random_model(cfg).state_dict(), tmp_path / "hf")
    ours = build_tokenizer(spec)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "def add(a, b):\n    return a + b  # sum"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == ours.eod
    import_hf(tmp_path / "hf", tmp_path / "run")
    copied = tmp_path / "run" / ("tokenizer.json" if spec.endswith(".json") else "tokenizer.model")
    assert copied.read_bytes() == Path(spec).read_bytes()
