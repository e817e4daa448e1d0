"""`aoe-ep import HF_DIR OUT_DIR`: a Mixtral- or Llama-format Hugging Face directory becomes an aoe-ep run directory.

OUT_DIR receives `config.yaml` (the model, `train.out_dir` = OUT_DIR), the tokenizer file, and
`checkpoints/step_00000000` with `latest`: a complete training checkpoint (weights, a fresh AdamW state, the
schedule at step 0), so that `aoe-ep eval --checkpoint OUT_DIR`, `aoe-ep generate --checkpoint OUT_DIR` and
`aoe-ep train --config OUT_DIR/config.yaml --resume` (at any EP / DP layout: checkpoints reshard on load) all start
from it. An aoe-ep export of the same kind (`aoe-ep export`) reads back bit-identical in every tensor.

Grouped-query attention is expanded to one key/value head per query head (each KV head repeated for its group, as
transformers' `repeat_kv` does): the same function, in aoe-ep's multi-head layout. What aoe-ep's decoder cannot
compute (biases, scaled RoPE, sliding windows, another activation) is refused naming the setting. Nothing is written
unless everything worked.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from aoe_ep.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, TrainConfig
from aoe_ep.data import build_tokenizer
from aoe_ep.hf.errors import ConversionError
from aoe_ep.hf.export import TOKENIZER_KEY
from aoe_ep.hf.staging import check_destination, quiet_transformers, staged_directory

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    checkpoint: Path
    cfg: Config
    model_type: str


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: not a model configuration")
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        names = ", ".join(raw.get("architectures") or []) or "no architectures"
        raise ConversionError(
            f"{path}: model_type {kind!r} ({names}) cannot be imported; aoe-ep imports "
            f"{' and '.join(ARCHITECTURES)} directories"
        )
    return raw


def _rope_theta(raw: dict, path: Path) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{path}: rope_type {rope_type!r} (scaled RoPE) is not aoe-ep's RoPE")
    return float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))


def check_settings(raw: dict, path: Path) -> None:
    """Refuse what aoe-ep's decoder would compute differently, naming the setting."""
    heads, d = raw["num_attention_heads"], raw["hidden_size"]
    checks = [
        ("hidden_act", raw.get("hidden_act", "silu") == "silu"),
        ("attention_bias", not raw.get("attention_bias", False)),
        ("mlp_bias", not raw.get("mlp_bias", False)),
        ("sliding_window", raw.get("sliding_window") is None),
        ("head_dim", raw.get("head_dim") in (None, d // heads) and d % heads == 0),
    ]
    for name, ok in checks:
        if not ok:
            raise ConversionError(f"{path}: {name}={raw.get(name)!r} has no counterpart in aoe-ep's decoder")
    kv = raw.get("num_key_value_heads") or heads
    if heads % kv:
        raise ConversionError(f"{path}: num_key_value_heads={kv} does not divide num_attention_heads={heads}")


def aoe_config(raw: dict, path: Path, tokenizer: str, out_dir: Path) -> Config:
    """The aoe-ep Config of a Mixtral / Llama configuration."""
    check_settings(raw, path)
    moe_kind = raw["model_type"] == "mixtral"
    try:
        model = ModelConfig(
            n_layers=raw["num_hidden_layers"],
            d_model=raw["hidden_size"],
            n_heads=raw["num_attention_heads"],
            vocab_size=raw["vocab_size"],
            max_seq_len=raw["max_position_embeddings"],
            ffn="moe" if moe_kind else "dense",
            d_ffn=raw["intermediate_size"],
            rope_theta=_rope_theta(raw, path),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        )
        moe = None
        if moe_kind:
            moe = MoEConfig(
                d_model=raw["hidden_size"],
                num_experts=raw["num_local_experts"],
                top_k=raw["num_experts_per_tok"],
                scorer="router",
                d_ffn=raw["intermediate_size"],
                expert_kind="swiglu",
                aux_loss_coeff=float(raw.get("router_aux_loss_coef", 0.01)),
            )
        cfg = Config(
            model=model, moe=moe, data=DataConfig(tokenizer=tokenizer), train=TrainConfig(out_dir=str(out_dir))
        )
        return cfg.validate()
    except KeyError as err:
        raise ConversionError(f"{path}: has no {err.args[0]!r}") from None
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConversionError(f"{index}: not a safetensors index ({err})") from None
        return [hf_dir / name for name in names]
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise ConversionError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json)")
    return [single]


def check_weight_files(hf_dir: Path) -> set[str]:
    """Every safetensors file opens and holds readable tensors; returns the tensor names on disk."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in _safetensors_files(hf_dir):
        if not file.is_file():
            raise ConversionError(f"{file}: named by the index but missing")
        try:
            with safe_open(str(file), framework="pt") as f:  # checks the header against the file's length
                names.update(f.keys())
        except ConversionError:
            raise
        except Exception as err:
            raise ConversionError(
                f"{file}: not a readable safetensors file ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else 'truncated'})"
            ) from None
    return names


def load_hf_state(hf_dir: Path, raw: dict) -> dict[str, torch.Tensor]:
    """transformers' own model of `raw`, loaded from the directory in fp32; every weight must come from the files."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    cls = MixtralForCausalLM if raw["model_type"] == "mixtral" else LlamaForCausalLM
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(hf_dir), dtype=torch.float32, output_loading_info=True)
    except Exception as err:
        raise ConversionError(
            f"{hf_dir}: transformers cannot load it as {cls.__name__} "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0]})"
        ) from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    if raw.get("tie_word_embeddings") and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    problems = [
        ("missing", missing),
        ("unexpected", list(info.get("unexpected_keys", []))),
        (
            "of the wrong shape",
            [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", [])],
        ),
    ]
    for what, keys in problems:
        if keys:
            raise ConversionError(
                f"{hf_dir}: the safetensors weights do not fit {cls.__name__}: {keys[0]!r} is "
                f"{what}" + (f" ({len(keys)} tensors in all)" if len(keys) > 1 else "")
            )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if raw.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    return state


def aoe_state_dict(cfg: Config, hf: dict[str, torch.Tensor], kv_heads: int) -> dict[str, torch.Tensor]:
    """transformers' (in-memory) state dict -> aoe-ep's single-device one; GQA's k/v heads repeated per group."""
    m = cfg.model
    d_head = m.d_model // m.n_heads
    group = m.n_heads // kv_heads

    def heads(w: torch.Tensor) -> torch.Tensor:  # [kv·d_head, d] -> [n_heads·d_head, d]
        return (
            w.view(kv_heads, 1, d_head, -1).expand(kv_heads, group, d_head, w.shape[-1]).reshape(m.n_heads * d_head, -1)
        )

    out = {
        "embed.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "head.weight": hf["lm_head.weight"],
    }
    for i in range(m.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "attn.wqkv.weight"] = torch.cat(
            [
                hf[src + "self_attn.q_proj.weight"],
                heads(hf[src + "self_attn.k_proj.weight"]),
                heads(hf[src + "self_attn.v_proj.weight"]),
            ]
        )
        out[dst + "attn.wo.weight"] = hf[src + "self_attn.o_proj.weight"]
        if cfg.moe is None:
            out[dst + "ffn.w_gate"] = hf[src + "mlp.gate_proj.weight"].t()
            out[dst + "ffn.w_p"] = hf[src + "mlp.up_proj.weight"].t()
            out[dst + "ffn.w_o"] = hf[src + "mlp.down_proj.weight"].t()
        else:
            gate_up = hf[src + "mlp.experts.gate_up_proj"]
            f = gate_up.shape[1] // 2
            out[dst + "ffn.scorer.weight"] = hf[src + "mlp.gate.weight"]
            out[dst + "ffn.experts.w_gate"] = gate_up[:, :f].transpose(1, 2)
            out[dst + "ffn.experts.w_p"] = gate_up[:, f:].transpose(1, 2)
            out[dst + "ffn.experts.w_o"] = hf[src + "mlp.experts.down_proj"].transpose(1, 2)
    return {k: v.float().contiguous().clone() for k, v in out.items()}


def find_tokenizer(hf_dir: Path, raw: dict, asked: str | None) -> tuple[str, Path | None]:
    """(tokenizer spec for the run, file to copy or None): --tokenizer, else `aoe_ep_tokenizer: byte` in
    config.json (an aoe-ep export of a byte-level model, whose tokenizer.json is the byte tokenizer), else the
    directory's tokenizer.json / tokenizer.model; otherwise an error."""
    if asked is not None:
        return (asked, None) if asked == "byte" else (asked, Path(asked))
    if raw.get(TOKENIZER_KEY) == "byte":
        return "byte", None
    for name in ("tokenizer.json", "tokenizer.model"):
        if (hf_dir / name).is_file():
            return name, hf_dir / name
    raise ConversionError(
        f"{hf_dir}: no tokenizer.json or tokenizer.model; pass --tokenizer (a .json / .model file, or 'byte')"
    )


def write_run(cfg: Config, state: dict[str, torch.Tensor], stage: Path, final: Path) -> Path:
    """A complete step-0 checkpoint of `state` under `stage` (its config naming `final`), written by the
    trainer's own save (an in-process world of one)."""
    from aoe_ep.model import Decoder
    from aoe_ep.parallel.runtime import setup_runtime, teardown
    from aoe_ep.train import checkpoint as ckpt
    from aoe_ep.train.optim import build_optimizer, build_scheduler

    train = dataclasses.replace(cfg.train, device="cpu")
    runtime = setup_runtime(train, 1)
    try:
        model = Decoder(cfg.model, cfg.moe, ep_group=runtime.groups.ep_group)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ConversionError(
                f"converted weights do not fit aoe-ep's model: {' '.join(str(err).split())[:300]}"
            ) from None
        optimizer = build_optimizer(model, train, runtime.device)
        scheduler = build_scheduler(optimizer, train)
        progress = {"step": 0, "consumed_samples": 0}
        state_dcp = ckpt.training_state(model, optimizer, scheduler, progress, runtime)
        meta = dict(progress, world_size=1, expert_parallel_size=1)
        config_yaml = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
        (stage / "config.yaml").write_text(config_yaml)
        path = ckpt.save_checkpoint(ckpt.checkpoint_root(stage), 0, state_dcp, runtime, meta, config_yaml)
    finally:
        teardown(runtime)
    return ckpt.checkpoint_root(final) / path.name


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer: str | None = None, transform=None) -> ImportResult:
    """Import `hf_dir` into the new run directory `out_dir`. `transform(cfg, state) -> (cfg, state)` rewrites the
    model before it is written (AoE upcycling)."""
    hf_dir, out = Path(hf_dir), check_destination(out_dir)
    raw = read_hf_config(hf_dir)
    spec, source = find_tokenizer(hf_dir, raw, tokenizer)
    final = out.resolve()
    run_spec = spec if source is None else str(final / source.name)
    cfg = aoe_config(raw, hf_dir / "config.json", run_spec, final)
    if source is not None:
        try:
            build_tokenizer(str(source))
        except Exception as err:
            raise ConversionError(f"{source}: {err}") from None
    check_weight_files(hf_dir)
    hf = load_hf_state(hf_dir, raw)
    state = aoe_state_dict(cfg, hf, raw.get("num_key_value_heads") or raw["num_attention_heads"])
    if transform is not None:
        cfg, state = transform(cfg, state)
    with staged_directory(out) as stage:
        if source is not None:
            shutil.copyfile(source, stage / source.name)
        checkpoint = write_run(cfg, state, stage, final)
    return ImportResult(out_dir=out, checkpoint=checkpoint, cfg=cfg, model_type=raw["model_type"])
