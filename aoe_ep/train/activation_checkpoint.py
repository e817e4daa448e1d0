"""Activation checkpointing applied from outside the model: `apply_activation_checkpointing(model, mode, every)`.

- `full`: each chosen decoder block keeps only its input; its forward runs again in backward.
- `selective`: cheap-to-recompute, expensive-to-keep pieces of each chosen block are recomputed, everything the
  expert-parallel collectives produce is kept. Per block: the two RMSNorms keep only their input (x·rstd and rstd are
  recomputed); attention keeps its QKV projection and the SDPA output and log-sum-exp, and recomputes RoPE's rotated q
  and k and the output projection's input copy (`recompute_activations`, aoe_ep/model/attention.py: saved-tensor
  hooks, no checkpoint region, so no per-operator dispatch mode); a dense SwiGLU keeps x·Wg and x·Wp (SiLU and the
  product are recomputed). An MoE layer is not checkpointed as a whole (that would run its all-gathers or all-to-alls
  again): its experts keep only their rows (x and, for AoE, the cache rows C), which they hold anyway, and recompute
  their two [M, W] pre-activations x·Wg and x·Wp (C·Wup) in backward (`recompute_activations`, aoe_ep/moe/experts.py),
  the widest tensors of the layer; SiLU and the product are recomputed under every mode. The scorer, the decision,
  dispatch and combine keep what they keep without checkpointing: the dispatched rows, the expert outputs the gates'
  gradient reads, and the small [T, n] selection tensors.

A recomputed MoE layer (under `full`) takes the same decision as its first forward, since it computes the same
scores from the same input and buffers with the same arithmetic. Its statistics are values in its `MoEInfo`,
which checkpoint's recompute discards, so they are counted once; the one side effect, the dispatcher's byte
counter, is paused while the recompute runs (it runs inside backward, where autograd has a current graph task).
A block with an MoE layer recomputes to its end (no early stop), so every rank of an expert-parallel group runs the
same collectives in the same order.

Every block-level wrapper replaces the module's `forward` on the instance: parameter names, state dicts and
checkpoints are unchanged, and FSDP2's hooks (applied afterwards) wrap the checkpointed forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    set_checkpoint_early_stop,
)

from aoe_ep.config import AC_MODES
from aoe_ep.model.kv_cache import LayerKVCache
from aoe_ep.moe import MoELayer

_aten = torch.ops.aten
MATMULS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default)
# Attention kernels whose outputs (the attention output and its log-sum-exp) are kept: recomputing them costs as much
# as the first forward.
ATTENTION_KERNELS = tuple(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(_aten, name)
)


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (where checkpoint recomputes)."""
    return torch._C._current_graph_task_id() != -1


def _moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def _counted_once(fn: Callable, moe_layers: list[MoELayer]) -> Callable:
    """`fn`, with the MoE layers' byte counters paused when it runs as a recompute."""

    def run(*args, **kwargs):
        if not moe_layers or not in_backward():
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for layer in moe_layers:
                stack.enter_context(layer.dispatcher.counter.paused())
            return fn(*args, **kwargs)

    return run


def _active(module: nn.Module, *args, **kwargs) -> bool:
    """Checkpoint only where a backward will follow: training with gradients into the input, no KV cache."""
    if not (module.training and torch.is_grad_enabled()):
        return False
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return False
    return not any(isinstance(a, LayerKVCache) for a in list(args) + list(kwargs.values()))


def _checkpoint_forward(module: nn.Module, context_fn: Optional[Callable] = None) -> None:
    """Replace `module.forward` with its checkpointed self (a plain one, or a selective one with `context_fn`)."""
    inner = module.forward
    moe_layers = _moe_layers(module)
    recompute = _counted_once(inner, moe_layers)

    def forward(*args, **kwargs):
        if not _active(module, *args, **kwargs):
            return inner(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        # A region with an MoE layer recomputes to its end, so that every rank runs the same collectives; any other
        # stops as soon as backward has what it needs.
        with set_checkpoint_early_stop(not moe_layers):
            return checkpoint(recompute, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

    forward.checkpointed = True
    module.forward = forward


def keep_all_but_last_matmul(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy of one region: keep the attention kernels' outputs and every matmul's output except
    the region's last (its output leaves the region and nothing inside needs it); recompute everything else."""
    if op in ATTENTION_KERNELS:
        return CheckpointPolicy.MUST_SAVE
    if op in MATMULS:
        seen = ctx.matmuls.get(ctx.is_recompute, 0)
        ctx.matmuls[ctx.is_recompute] = seen + 1
        return CheckpointPolicy.MUST_SAVE if seen < ctx.keep_matmuls else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts(keep_matmuls: int):
    """Fresh selective-checkpoint contexts for one call of a region that runs `keep_matmuls + 1` matmuls."""
    counts: dict = {}

    def policy(ctx, op, *args, **kwargs):
        ctx.matmuls, ctx.keep_matmuls = counts, keep_matmuls
        return keep_all_but_last_matmul(ctx, op, *args, **kwargs)

    return create_selective_checkpoint_contexts(policy)


def checkpoint_entries(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward is checkpointed in `model` (their inputs are what the checkpoint keeps)."""
    return [m for m in model.modules() if getattr(m.forward, "checkpointed", False)]


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"activation checkpointing needs a decoder with `blocks`, got {type(model).__name__}")
    return list(blocks)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> list[nn.Module]:
    """Checkpoint every `every`-th decoder block of `model` (blocks 0, every, 2·every, ...) under `mode` (one of
    `AC_MODES`), in place; returns the checkpointed modules. Apply before the data-parallel wrapper and compile."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode must be one of {AC_MODES}, got {mode!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"activation checkpointing every: must be a positive integer, got {every!r}")
    if mode == "none":
        return []
    chosen = [block for index, block in enumerate(_blocks(model)) if index % every == 0]
    for block in chosen:
        if mode == "full":
            _checkpoint_forward(block)
            continue
        _checkpoint_forward(block.attn_norm)
        _checkpoint_forward(block.ffn_norm)
        block.attn.recompute_activations = True  # keeps QKV and SDPA's outputs; RoPE and Wo's input recomputed
        if isinstance(block.ffn, MoELayer):
            block.ffn.experts.recompute_activations = True  # keeps the rows, recomputes x·Wg, x·Wp
        else:
            _checkpoint_forward(block.ffn, partial(_selective_contexts, 2))  # keeps x·Wg, x·Wp
    return checkpoint_entries(model)
