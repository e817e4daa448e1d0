"""`torch.compile` applied from outside the model: `compile_blocks(model, device)`.

Compiled per decoder block, each as one graph (`dynamic=False`), in place (an instance attribute over the class's
method), so that parameter names and checkpoints are unchanged:
- the block up to its FFN, `DecoderBlock.mix`: both RMSNorms, attention and the residual add between them (one graph
  boundary per block instead of three; the norms fuse with the residual add);
- a dense SwiGLU's `forward`;
- an MoE layer's gating on a single device, `MoELayer.gate`: the gates, the softmax over all experts, the per-token
  entropy and selection margin, the batch sums and the balancing loss, forward and backward.
The rest of an MoE layer runs eagerly: the decision's grouping, the experts and the combine read host-side sizes
(rows per expert, per rank), each of which would break the graph or recompile it; under expert parallelism the
gating's batch sums are collectives, so it stays eager there too.

The compiled pieces run compiled while their module is training and without a KV cache; in eval mode (validation,
evaluation, generation) they run eagerly: prompt lengths and decoding steps change the shapes every call, and each
new shape would compile again.

Before anything is compiled, one tiny function is compiled and run on the device, so that a machine that cannot
compile (no C++ compiler for CPU code, a torch without a working inductor) stops the run at start-up with one
clear error rather than at its first step. Apply after activation checkpointing and before the data-parallel
wrapper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from aoe_ep.config import ConfigError
from aoe_ep.moe import MoELayer


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) * x + 1.0


def check_compile(device: torch.device) -> None:
    """Raise a ConfigError naming `train.compile` when torch.compile cannot build and run code on `device`."""
    if not hasattr(torch, "compile"):
        raise ConfigError(f"train.compile: torch {torch.__version__} has no torch.compile")
    x = torch.arange(8, dtype=torch.float32, device=device)
    try:
        got = torch.compile(_probe, dynamic=False)(x)
    except Exception as err:  # noqa: BLE001 - inductor raises many kinds (a missing compiler is a CppCompileError or an OSError)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"train.compile: this machine cannot compile for {device.type} ({type(err).__name__}: "
            f"{first}); set train.compile=false"
        ) from None
    if not torch.allclose(got, _probe(x)):
        raise ConfigError(f"train.compile: compiled code on {device.type} gives wrong results; set train.compile=false")


def compiled_methods(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, method name) of each piece `compile_blocks` compiles, in block order: every block's `mix`, a dense
    block's FFN `forward`, and a single-device MoE layer's `gate`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"compile needs a decoder with `blocks`, got {type(model).__name__}")
    out = []
    for block in blocks:
        out.append((block, "mix"))
        if not isinstance(block.ffn, MoELayer):
            out.append((block.ffn, "forward"))
        elif block.ffn.dispatcher.ep_size == 1:  # under expert parallelism the gating's sums are collectives
            out.append((block.ffn, "gate"))
    return out


def is_compiled(module: nn.Module, name: str) -> bool:
    """Whether `compile_blocks` has compiled `module`'s method `name`."""
    return getattr(getattr(module, name), "compiled", False)


def _while_training(module: nn.Module, eager: Callable, takes_cache: bool) -> Callable:
    """`eager` compiled, run so while `module` trains (and, for a method that `takes_cache` as its second argument,
    without a KV cache), else eagerly."""
    compiled = torch.compile(eager, dynamic=False)

    def run(*args, **kwargs):
        cached = takes_cache and (kwargs.get("cache") is not None or (len(args) > 1 and args[1] is not None))
        return compiled(*args, **kwargs) if module.training and not cached else eager(*args, **kwargs)

    run.compiled = True
    return run


def compile_blocks(model: nn.Module, device: torch.device) -> list[tuple[nn.Module, str]]:
    """Check that `device` can compile, then compile the methods `compiled_methods` names, in place. Returns them."""
    check_compile(device)
    methods = compiled_methods(model)
    for module, name in methods:
        if not is_compiled(module, name):
            setattr(module, name, _while_training(module, getattr(module, name), takes_cache=name == "mix"))
    return methods
