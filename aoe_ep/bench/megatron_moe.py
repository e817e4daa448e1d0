"""The routed MoE layer against megatron-core's own `MoELayer` on the same shape, forward+backward, on CUDA
(megatron-core's MoE layer needs CUDA). Megatron uses its grouped GEMM where it has one (Transformer Engine's, or
the `grouped_gemm` package's), else its `SequentialMLP` loop; the result says which ran.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from aoe_ep.bench.measure import interleaved_times
from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer


def _megatron_layer(d_model: int, d_ffn: int, num_experts: int, top_k: int, dtype: torch.dtype):
    import aoe_ep.megatron_core  # noqa: F401  (first: megatron-core without its TE / apex start-up warnings)

    # isort: split
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    grouped = True
    try:
        from megatron.core.transformer.moe import grouped_gemm_util as gg

        grouped = gg.grouped_gemm_is_available()
    except ImportError:
        grouped = False
    try:
        import transformer_engine  # noqa: F401

        use_te, grouped = True, True
    except ImportError:
        use_te = False
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=d_model,
        num_attention_heads=max(1, d_model // 64),
        ffn_hidden_size=d_ffn,
        moe_ffn_hidden_size=d_ffn,
        num_moe_experts=num_experts,
        moe_router_topk=top_k,
        moe_token_dispatcher_type="alltoall",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        moe_grouped_gemm=grouped,
        moe_aux_loss_coeff=0.01,
        moe_router_load_balancing_type="aux_loss",
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
    spec = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=grouped)
    layer = build_module(spec, config=cfg, layer_number=1).cuda()
    return layer, f"{type(layer.experts).__name__}" + ("" if grouped else " (no grouped GEMM available)")


def compare(
    tokens: int = 16384,
    d_model: int = 768,
    d_ffn: int = 3072,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    iters: int = 5,
    rounds: int = 3,
) -> dict:
    """tokens/s of both layers and their ratio; on failure, the reason instead."""
    device = torch.device("cuda")
    ours = MoELayer(
        MoEConfig(
            scorer="router", d_model=d_model, d_ffn=d_ffn, num_experts=num_experts, top_k=top_k, aux_loss_coeff=0.01
        )
    ).to(device, dtype)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype)
    g = torch.randn_like(x)
    result: dict = {"tokens": tokens, "shape": dict(d_model=d_model, d_ffn=d_ffn, num_experts=num_experts, top_k=top_k)}

    def ours_step() -> None:
        y, info = ours(x)
        ((y * g).sum() + info.aux_loss).backward()

    steps = {"aoe_ep": ours_step}
    theirs: Optional[torch.nn.Module] = None
    try:
        theirs, kind = _megatron_layer(d_model, d_ffn, num_experts, top_k, dtype)
        x_SBD = x.view(tokens, 1, d_model)

        def theirs_step() -> None:
            out = theirs(x_SBD)
            y = out[0] if isinstance(out, tuple) else out
            (y.view_as(g) * g).sum().backward()

        theirs_step()
        steps["megatron"] = theirs_step
        result["megatron_experts"] = kind
    except Exception as err:  # report why, do not fail the GPU check
        result["megatron_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}"
    ours_step()
    seconds = interleaved_times(steps, iters, rounds, device)
    result["tokens_per_s"] = {name: tokens / s for name, s in seconds.items()}
    if "megatron" in seconds:
        result["aoe_ep/megatron"] = seconds["megatron"] / seconds["aoe_ep"]
    return result
