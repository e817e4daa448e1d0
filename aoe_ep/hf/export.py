"""`aoe-ep export`: a checkpoint becomes a Hugging Face model directory.

- Dense models: a stock `LlamaForCausalLM`. Routed MoE with SwiGLU experts, a linear router, top-K and the
  `softmax_topk` gate (no balancing bias): a stock `MixtralForCausalLM`. Both load without remote code.
- Every other MoE layer: the `aoe_ep` architecture, whose configuration and modeling code (`configuration_aoe_ep.py`,
  `modeling_aoe_ep.py`, plain torch + transformers) are copied into the directory, for
  `AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`.

Weights go through transformers' own `save_pretrained` (safetensors, sharded with `model.safetensors.index.json`
above `max_shard_size`), with `config.json` and `generation_config.json` (greedy, stopping at the end-of-document id
as `aoe-ep generate` does). A tokenizers `.json` or sentencepiece `.model` tokenizer is copied beside them; the
byte tokenizer is written as an equivalent `tokenizer.json` (aoe_ep/hf/byte_tokenizer.py), and `config.json`
records it as `aoe_ep_tokenizer: byte`, which `aoe-ep import` reads back as the byte tokenizer.

The layouts match aoe-ep's decoder exactly: q/k/v are the three row blocks of the fused `wqkv` (head-major, the
same rotate-half RoPE on each head), every FFN matrix is stored transposed (aoe-ep applies x @ W, transformers
x @ W.T), Mixtral's `gate_up_proj` stacks W_g^T over W_p^T per expert.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from aoe_ep.config import Config
from aoe_ep.data import build_tokenizer
from aoe_ep.hf.byte_tokenizer import write_byte_tokenizer
from aoe_ep.hf.errors import ConversionError
from aoe_ep.hf.staging import quiet_transformers, staged_directory

FORMATS = ("auto", "llama", "mixtral", "aoe_ep")
TEMPLATES = ("configuration_aoe_ep.py", "modeling_aoe_ep.py")
TOKENIZER_KEY = "aoe_ep_tokenizer"  # config.json: "byte" when the model reads bytes (aoe-ep's byte tokenizer)
TRAINING_ONLY = ("threshold_lambda",)  # buffers that only steer training (the adaptive loss weight)
DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]


def mixtral_blockers(cfg: Config) -> list[str]:
    """The settings a stock MixtralForCausalLM cannot express, each as 'section.field=value'."""
    if cfg.model.ffn != "moe":
        return [f"model.ffn={cfg.model.ffn!r}"]
    m = cfg.moe
    wanted = {"scorer": "router", "router_hidden": 0, "selection": "top_k", "gate": "softmax_topk"}
    out = [f"moe.{k}={getattr(m, k)!r}" for k, v in wanted.items() if getattr(m, k) != v]
    if m.factorized:
        out.append(f"moe.expert_kind={m.expert_kind!r}")
    if m.balance == "bias":
        out.append("moe.balance='bias'")
    return out


def choose_format(cfg: Config, asked: str = "auto") -> str:
    """'llama' for a dense model, 'mixtral' where it is exact, else 'aoe_ep'; a stock format that cannot express
    the model is refused naming the setting."""
    if asked not in FORMATS:
        raise ConversionError(f"--format {asked!r}: not one of {', '.join(FORMATS)}")
    dense = cfg.model.ffn == "dense"
    if asked == "llama" and not dense:
        raise ConversionError("--format llama: model.ffn='moe' has no LlamaForCausalLM form (Llama is dense)")
    if asked in ("mixtral", "aoe_ep") and dense:
        raise ConversionError(f"--format {asked}: model.ffn='dense' has no MoE layer; it exports as llama")
    blockers = mixtral_blockers(cfg)
    if asked == "mixtral" and blockers:
        raise ConversionError(
            f"--format mixtral: {blockers[0]} cannot be expressed by MixtralForCausalLM "
            f"(it routes by a linear router, top-K, softmax over the chosen, SwiGLU experts); "
            f"export it with --format aoe_ep"
        )
    if asked != "auto":
        return asked
    return "llama" if dense else "mixtral" if not blockers else "aoe_ep"


# ----------------------------------------------------------------------------------------------------------------
# Configurations


def _common(cfg: Config, eod: int) -> dict:
    m = cfg.model
    return dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eod,
        pad_token_id=None,
    )


def hf_config(cfg: Config, fmt: str, eod: int):
    """The transformers configuration of `fmt` for the model of `cfg`."""
    m = cfg.model
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if fmt == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            **_common(cfg, eod),
            intermediate_size=m.d_ffn,
            num_key_value_heads=m.n_heads,
            head_dim=m.d_model // m.n_heads,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rope_parameters=rope,
        )
    if fmt == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            **_common(cfg, eod),
            intermediate_size=cfg.moe.d_ffn,
            num_key_value_heads=m.n_heads,
            head_dim=m.d_model // m.n_heads,
            hidden_act="silu",
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.aux_loss_coeff,
            router_jitter_noise=0.0,
            sliding_window=None,
            rope_parameters=rope,
        )
    from aoe_ep.hf.configuration_aoe_ep import AoeEpConfig

    e = cfg.moe
    moe = dict(
        num_experts=e.num_experts,
        top_k=e.top_k,
        scorer=e.scorer,
        d_ffn=e.d_ffn,
        d_low=e.d_low,
        d_wide=e.d_wide,
        norm=e.norm,
        selection=e.selection,
        gate=e.gate,
        top_p=e.top_p,
        capacity_factor=e.capacity_factor,
        self_routing_offset=e.self_routing_offset,
        factorized=e.factorized,
        router_hidden=e.router_hidden,
        balance_bias=e.balance == "bias",
        threshold=e.threshold,
    )
    config = AoeEpConfig(**_common(cfg, eod), rope_theta=float(m.rope_theta), moe=moe)
    config.auto_map = {
        "AutoConfig": "configuration_aoe_ep.AoeEpConfig",
        "AutoModelForCausalLM": "modeling_aoe_ep.AoeEpForCausalLM",
    }
    config.architectures = ["AoeEpForCausalLM"]
    return config


# ----------------------------------------------------------------------------------------------------------------
# Weights


def hf_state_dict(cfg: Config, state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """aoe-ep's single-device state dict -> the transformers model's (in-memory names of transformers 5)."""
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in TRAINING_ONLY}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ConversionError(f"the checkpoint has no tensor {name!r}; it does not match its config.yaml")
        used.add(name)
        return state[name]

    d = cfg.model.d_model
    out["model.embed_tokens.weight"] = take("embed.weight")
    out["model.norm.weight"] = take("norm.weight")
    out["lm_head.weight"] = take("head.weight")
    for i in range(cfg.model.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "attn_norm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "ffn_norm.weight")
        wqkv = take(src + "attn.wqkv.weight")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = wqkv[j * d : (j + 1) * d]
        out[dst + "self_attn.o_proj.weight"] = take(src + "attn.wo.weight")
        ffn = src + "ffn."
        if fmt == "llama":
            out[dst + "mlp.gate_proj.weight"] = take(ffn + "w_gate").t()
            out[dst + "mlp.up_proj.weight"] = take(ffn + "w_p").t()
            out[dst + "mlp.down_proj.weight"] = take(ffn + "w_o").t()
        elif fmt == "mixtral":
            out[dst + "mlp.gate.weight"] = take(ffn + "scorer.weight")
            out[dst + "mlp.experts.gate_up_proj"] = torch.cat(
                [take(ffn + "experts.w_gate").transpose(1, 2), take(ffn + "experts.w_p").transpose(1, 2)], dim=1
            )
            out[dst + "mlp.experts.down_proj"] = take(ffn + "experts.w_o").transpose(1, 2)
        else:
            for name in sorted(k for k in state if k.startswith(ffn)):
                out[dst + "mlp." + name[len(ffn) :]] = take(name)
    left = sorted(set(state) - used)
    if left:
        raise ConversionError(
            f"the checkpoint holds {left[0]!r}, which the {fmt} format has no place for"
            + (f" ({len(left)} tensors in all)" if len(left) > 1 else "")
        )
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def model_class(fmt: str):
    if fmt == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM
    if fmt == "mixtral":
        from transformers import MixtralForCausalLM

        return MixtralForCausalLM
    from aoe_ep.hf.modeling_aoe_ep import AoeEpForCausalLM

    return AoeEpForCausalLM


def build_hf_model(cfg: Config, state: dict[str, torch.Tensor], fmt: str, eod: int):
    """The transformers model of `fmt` holding the checkpoint's weights (built on the meta device, then assigned
    the converted tensors: nothing is initialised twice)."""
    from transformers import GenerationConfig

    config = hf_config(cfg, fmt, eod)
    weights = hf_state_dict(cfg, state, fmt)
    with torch.device("meta"):
        model = model_class(fmt)(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise ConversionError(
            f"{fmt}: the converted weights do not fit the model ({name!r} is {'missing' if missing else 'unexpected'})"
        )
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eod, pad_token_id=eod, do_sample=False)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _write_tokenizer(spec: str, out: Path, max_len: int) -> str:
    """Copy a tokenizers / sentencepiece file, or write the byte tokenizer's tokenizer.json, with a
    tokenizer_config.json; returns the tokenizer file's name."""
    if spec == "byte":
        write_byte_tokenizer(out, max_len)
        return "tokenizer.json"
    tokenizer = build_tokenizer(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        shutil.copyfile(path, out / "tokenizer.json")
        from tokenizers import Tokenizer

        eos = Tokenizer.from_file(str(path)).id_to_token(tokenizer.eod)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
        if eos is not None:
            config["eos_token"] = eos
    else:
        shutil.copyfile(path, out / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "model_max_length": max_len,
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": True,
        }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path.name


def export_state(
    cfg: Config,
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    fmt: str = "auto",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> ExportResult:
    """Write the model of `cfg` with weights `state` (aoe-ep's single-device names) to `out_dir` (new or empty)."""
    fmt = choose_format(cfg, fmt)
    eod = build_tokenizer(cfg.data.tokenizer).eod
    model = build_hf_model(cfg, state, fmt, eod)
    with staged_directory(out_dir) as stage:
        with quiet_transformers():
            model.save_pretrained(str(stage), max_shard_size=max_shard_size)
        if fmt == "aoe_ep":
            here = Path(__file__).resolve().parent
            for name in TEMPLATES:
                shutil.copyfile(here / name, stage / name)
        _write_tokenizer(cfg.data.tokenizer, stage, cfg.model.max_seq_len)
        if cfg.data.tokenizer == "byte":
            config = json.loads((stage / "config.json").read_text())
            config[TOKENIZER_KEY] = "byte"
            (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    out = Path(out_dir)
    return ExportResult(out_dir=out, format=fmt, files=sorted(p.name for p in out.iterdir()))


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, fmt: str = "auto", max_shard_size: str | int = DEFAULT_SHARD_SIZE
) -> ExportResult:
    """`aoe-ep export CHECKPOINT OUT_DIR`: read the checkpoint on CPU (any layout) and write the directory."""
    from aoe_ep.hf.state import read_model_state

    _, cfg, _, state = read_model_state(checkpoint)
    return export_state(cfg, state, out_dir, fmt, max_shard_size)
