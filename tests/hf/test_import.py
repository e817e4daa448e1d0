"""`aoe-ep import`: Mixtral / Llama directories become run directories that eval, generate and training read;
export -> import -> export is bit-identical; bad directories give one clear error and leave nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aoe_ep.cli import main
from aoe_ep.eval.loading import open_checkpoint
from aoe_ep.hf.errors import ConversionError
from aoe_ep.hf.export import export_checkpoint, export_state
from aoe_ep.hf.importer import import_hf
from tests.hf.conftest import kind_config, random_model


def _weights(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (directory, aoe-ep model)} for a Mixtral and a Llama export."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for kind in ("mixtral", "dense"):
        cfg = kind_config(kind)
        model = random_model(cfg, seed=5)
        export_state(cfg, model.state_dict(), root / kind)
        out[kind] = (root / kind, model)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "dense"])
def test_round_trip_is_bit_identical(kind, exported, tmp_path):
    hf_dir, model = exported[kind]
    result = import_hf(hf_dir, tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "checkpoints" / "latest").is_file()
    with open_checkpoint(tmp_path / "run", device="cpu") as loaded:
        tokens_BS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(loaded.model(tokens_BS).logits, model(tokens_BS).logits)
    assert result.checkpoint.name == "step_00000000"
    assert (hf_dir / "tokenizer.json").is_file() and result.cfg.data.tokenizer == "byte"  # read back as bytes
    export_checkpoint(tmp_path / "run", tmp_path / "again")
    before, after = _weights(hf_dir), _weights(tmp_path / "again")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert json.loads((hf_dir / "config.json").read_text()) == json.loads(
        (tmp_path / "again" / "config.json").read_text()
    )


def test_grouped_query_attention_is_expanded_exactly(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=None,
    )
    hf = MixtralForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "run", tokenizer="byte")
    tokens_BS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with open_checkpoint(tmp_path / "run", device="cpu") as loaded, torch.no_grad():
        ours, theirs = loaded.model(tokens_BS).logits, hf(tokens_BS).logits
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


def test_cli_import_then_eval_generate_and_resume(exported, tmp_path, capsys):
    hf_dir, _ = exported["mixtral"]
    run = tmp_path / "run"
    assert main(["import", str(hf_dir), str(run)]) == 0
    assert (
        main(["generate", "--checkpoint", str(run), "--prompt", "def f", "--max-new-tokens", "4", "--device", "cpu"])
        == 0
    )
    from aoe_ep.config import load_config
    from aoe_ep.train.trainer import Trainer
    from tests.train.synthetic import BUILDERS

    cfg = load_config(
        str(run / "config.yaml"),
        [
            "train.max_steps=2",
            "train.warmup_steps=1",
            "data.seq_len=16",
            "train.global_batch_tokens=64",
            "train.micro_batch_size=2",
            "train.eval_at_start=false",
            "train.save_interval=2",
            "train.eval_interval=100",
        ],
    )
    with Trainer(cfg, resume="latest", data=BUILDERS) as trainer:
        assert trainer.step == 0
        result = trainer.fit()
    assert result.step == 2 and (run / "checkpoints" / "step_00000002").is_dir()


def _damaged(exported, tmp_path, how: str):
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported["mixtral"][0], hf_dir)
    weights = hf_dir / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "foreign":
        save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4)}, str(weights))
    elif how == "architecture":
        config = json.loads((hf_dir / "config.json").read_text())
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (hf_dir / "config.json").write_text(json.dumps(config))
    elif how == "tokenizer":
        config = json.loads((hf_dir / "config.json").read_text())
        del config["aoe_ep_tokenizer"]
        (hf_dir / "config.json").write_text(json.dumps(config))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (hf_dir / name).unlink()
    return hf_dir


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "not a readable safetensors file"),
        ("foreign", "do not fit MixtralForCausalLM"),
        ("architecture", "model_type 'gpt2'"),
        ("tokenizer", "no tokenizer.json or tokenizer.model"),
    ],
)
def test_bad_directory_gives_one_clear_error_and_writes_nothing(how, message, exported, tmp_path, capsys):
    hf_dir = _damaged(exported, tmp_path, how)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message) as err:
        import_hf(hf_dir, out)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    capsys.readouterr()
    assert main(["import", str(hf_dir), str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("aoe-ep import: error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_llama_with_a_setting_aoe_ep_lacks_is_refused(exported, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(exported["dense"][0], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["attention_bias"] = True
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="attention_bias=True"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
