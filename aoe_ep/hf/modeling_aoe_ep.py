"""An aoe-ep MoE language model for transformers: `AutoModelForCausalLM.from_pretrained(directory,
trust_remote_code=True)` loads an exported directory with this file, `generate()` runs with transformers' KV cache.

Plain torch and transformers, nothing else: the directory is all a user needs. The computation is aoe-ep's on one
device, written out densely: each token's expert scores (a learned router, AoE's ‖x Wdown_i‖ or a slice of the hidden
state), the selection (top-K, top-P, expert choice or threshold), the gates (softmax over the selected, the full
softmax, or relu(s − b)), and the SwiGLU experts (factorised W_g = Wdown·Wup where configured).

Selection per token (top-K, top-P, threshold) does not depend on the other tokens, so the cache changes nothing;
expert choice shares each expert's capacity over the tokens of one forward call, so its outputs depend on them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_aoe_ep import AoeEpConfig

NORM_ORDERS = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class AoeEpRotary(nn.Module):
    """cos/sin of positions [0, max_position_embeddings), computed in float64 and kept per device (not weights)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self._tables = {}

    def tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._tables:
            inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            table_dtype = torch.get_default_dtype()
            self._tables[key] = (
                angles.cos().to(table_dtype).to(device).to(dtype),
                angles.sin().to(table_dtype).to(device).to(dtype),
            )
        return self._tables[key]

    def forward(self, position_ids, device, dtype):
        """cos, sin [B, 1, S, head_dim] at `position_ids` [B, S]."""
        if int(position_ids.max()) >= self.max_positions:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_position_embeddings={self.max_positions}")
        cos, sin = self.tables(device, dtype)
        return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


class AoeEpAttention(nn.Module):
    def __init__(self, config: AoeEpConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        batch, seq, d = x.shape
        q, k, v = (
            proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq, d))


class AoeEpScorer(nn.Module):
    """s [T, n]: router logits, AoE norms ‖x Wdown_i‖ (with the cache C [T, n, d_low]) or Self-Routing's slice."""

    def __init__(self, config: AoeEpConfig):
        super().__init__()
        m, d = config.moe, config.hidden_size
        self.kind = m["scorer"]
        if self.kind == "router":
            width = m["router_hidden"] or d
            if m["router_hidden"]:
                self.w_hidden = nn.Parameter(torch.empty(d, m["router_hidden"]))
            self.weight = nn.Parameter(torch.empty(m["num_experts"], width))
        elif self.kind == "aoe":
            self.w_down = nn.Parameter(torch.empty(m["num_experts"], d, m["d_low"]))
            self.ord = NORM_ORDERS[m["norm"]]
        self.offset, self.num_experts = m["self_routing_offset"], m["num_experts"]

    def forward(self, x_TD):
        if self.kind == "router":
            h = F.silu(x_TD @ self.w_hidden) if hasattr(self, "w_hidden") else x_TD
            return _fp32(h @ self.weight.t()), None
        if self.kind == "aoe":
            n, d, low = self.w_down.shape
            cache = (x_TD @ self.w_down.permute(1, 0, 2).reshape(d, n * low)).view(x_TD.shape[0], n, low)
            return torch.linalg.vector_norm(_fp32(cache), ord=self.ord, dim=-1), cache
        return _fp32(x_TD[:, self.offset : self.offset + self.num_experts]), None


def _fp32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _ranked(values, dim):
    return torch.sort(values, dim=dim, descending=True, stable=True).indices


class AoeEpMoE(nn.Module):
    def __init__(self, config: AoeEpConfig):
        super().__init__()
        m, d = config.moe, config.hidden_size
        self.m = m
        n = m["num_experts"]
        self.scorer = AoeEpScorer(config)
        self.experts = nn.Module()
        if m["factorized"]:
            low, wide = m["d_low"], m["d_wide"]
            if m["scorer"] != "aoe":
                self.experts.w_down = nn.Parameter(torch.empty(n, d, low))
            self.experts.w_up = nn.Parameter(torch.empty(n, low, wide))
            self.experts.w_p = nn.Parameter(torch.empty(n, d, wide))
            self.experts.w_o = nn.Parameter(torch.empty(n, wide, d))
        else:
            f = m["d_ffn"]
            self.experts.w_gate = nn.Parameter(torch.empty(n, d, f))
            self.experts.w_p = nn.Parameter(torch.empty(n, d, f))
            self.experts.w_o = nn.Parameter(torch.empty(n, f, d))
        if m["balance_bias"]:
            self.register_buffer("expert_bias", torch.zeros(n))
        if m["selection"] == "threshold":
            self.threshold_bias = nn.Parameter(torch.zeros(n))

    def _decide(self, s):
        """(mask [T, n], gates [T, n]) from the scores."""
        m = self.m
        if m["selection"] == "threshold":
            g = torch.relu(s - self.threshold_bias.to(s.dtype))
            mask = g > m["threshold"]
            return mask, g * mask
        ranked = s + self.expert_bias.to(s.dtype) if hasattr(self, "expert_bias") else s
        if m["selection"] == "top_k":
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, _ranked(ranked, 1)[:, : m["top_k"]], True)
        elif m["selection"] == "top_p":
            probs = torch.softmax(ranked, dim=1)
            order = _ranked(probs, 1)
            before = torch.cumsum(probs.gather(1, order), dim=1).roll(1, dims=1)
            before[:, 0] = 0.0
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, before < m["top_p"])
        else:  # expert choice: each expert takes its C tokens of highest probability
            tokens, n = s.shape
            capacity = min(tokens, math.ceil(tokens * m["capacity_factor"] / n))
            chosen = _ranked(torch.softmax(ranked, dim=1), 0)[:capacity]
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(0, chosen, True)
        probs = torch.softmax(s, dim=1)
        if m["gate"] == "softmax_all":
            return mask, probs * mask
        row_max = s.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp((s - row_max).masked_fill(~mask, float("-inf")))
        return mask, e / e.sum(dim=1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)

    def forward(self, x):
        d = x.shape[-1]
        x_TD = x.reshape(-1, d)
        s, cache = self.scorer(x_TD)
        mask, gates = self._decide(s)
        ex = self.experts
        y_TD = torch.zeros(x_TD.shape, dtype=gates.dtype, device=x.device)
        for e in range(mask.shape[1]):
            token_M = torch.nonzero(mask[:, e]).flatten()
            if token_M.numel() == 0:
                continue
            x_MD = x_TD[token_M]
            if not self.m["factorized"]:
                a = x_MD @ ex.w_gate[e]
            else:
                c = cache[token_M, e] if cache is not None else x_MD @ ex.w_down[e]
                a = c @ ex.w_up[e]
            out = (F.silu(a) * (x_MD @ ex.w_p[e])) @ ex.w_o[e]
            y_TD.index_add_(0, token_M, out.to(gates.dtype) * gates[token_M, e].unsqueeze(1))
        return y_TD.to(x.dtype).view(x.shape)


class AoeEpDecoderLayer(nn.Module):
    def __init__(self, config: AoeEpConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = AoeEpAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = AoeEpMoE(config)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class AoeEpPreTrainedModel(PreTrainedModel):
    config_class = AoeEpConfig
    base_model_prefix = "model"
    _no_split_modules = ["AoeEpDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, AoeEpMoE):
            for _name, p in module.named_parameters(recurse=False):
                nn.init.zeros_(p)
            for p in list(module.experts.parameters()) + list(module.scorer.parameters()):
                nn.init.normal_(p, std=std)


class AoeEpModel(AoeEpPreTrainedModel):
    def __init__(self, config: AoeEpConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(AoeEpDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = AoeEpRotary(
            config.hidden_size // config.num_attention_heads, config.max_position_embeddings, config.rope_theta
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=x.device).unsqueeze(0).expand(batch, -1)
        cos, sin = self.rotary(position_ids, x.device, x.dtype)
        mask, is_causal = _attention_mask(attention_mask, batch, seq, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, past_key_values if use_cache else None)
        return self.norm(x), (past_key_values if use_cache else None)


def _attention_mask(attention_mask, batch, seq, past, device):
    """(boolean mask [B, 1, S, past + S] or None, is_causal) for queries at positions past..past+S-1."""
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if not padded:
        if past == 0:
            return None, seq > 1
        if seq == 1:
            return None, False
    keys = torch.arange(past + seq, device=device)
    causal = keys[None, :] <= past + torch.arange(seq, device=device)[:, None]
    mask = causal[None, None].expand(batch, 1, seq, past + seq)
    if padded:
        mask = mask & attention_mask.bool()[:, None, None, : past + seq]
        # a query that sees no key at all (a pad position) attends to itself, so that its row is not NaN
        mask = mask | (
            ~mask.any(dim=-1, keepdim=True)
            & (keys[None, None, None, :] == (past + torch.arange(seq, device=device))[None, None, :, None])
        )
    return mask, False


class AoeEpForCausalLM(AoeEpPreTrainedModel, GenerationMixin):
    def __init__(self, config: AoeEpConfig):
        super().__init__(config)
        self.model = AoeEpModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ):
        # `cache` is the name transformers >= 5.2 passes, `past_key_values` the earlier one
        hidden, cache = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        try:
            return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        except TypeError:  # transformers before the rename
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
