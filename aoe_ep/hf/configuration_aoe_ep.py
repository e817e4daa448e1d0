"""Configuration of an aoe-ep MoE language model exported for transformers (`model_type` "aoe_ep").

Written into every exported directory whose MoE layer no stock transformers architecture expresses (AoE,
Self-Routing, factorised routers, `softmax_all`, top-P, expert choice, threshold selection, balancing biases);
loaded with `AutoConfig.from_pretrained(directory, trust_remote_code=True)`. Imports only transformers.
"""

from transformers import PretrainedConfig

MOE_DEFAULTS = {
    "num_experts": 8,
    "top_k": 2,
    "scorer": "aoe",
    "d_ffn": 3072,
    "d_low": 256,
    "d_wide": None,
    "norm": "l2",
    "selection": "top_k",
    "gate": "softmax_topk",
    "top_p": 0.6,
    "capacity_factor": 2.0,
    "self_routing_offset": 0,
    "factorized": True,
    "router_hidden": 0,
    "balance_bias": False,
    "threshold": 0.0,
}


class AoeEpConfig(PretrainedConfig):
    """A Llama-shaped decoder (pre-RMSNorm, rotate-half RoPE, multi-head attention without bias, untied head)
    whose every feed-forward layer is the MoE layer described by `moe` (the keys of `MOE_DEFAULTS`)."""

    model_type = "aoe_ep"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        moe=None,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        unknown = sorted(set(moe or {}) - set(MOE_DEFAULTS))
        if unknown:
            raise ValueError(f"moe.{unknown[0]}: unknown key (known: {', '.join(sorted(MOE_DEFAULTS))})")
        self.moe = {**MOE_DEFAULTS, **(moe or {})}
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
