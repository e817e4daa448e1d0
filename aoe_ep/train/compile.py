"""`torch.compile` applied from outside the model: `compile_blocks(model, device)`.

Compiled per decoder block: the two RMSNorms, attention and a dense SwiGLU, each as its own graph
(`nn.Module.compile`, in place, so parameter names and checkpoints are unchanged). An MoE layer runs eagerly: its
dispatchers read host-side sizes (rows per expert, per rank) every step, each of which would break the graph or
recompile it. Before anything is compiled, one tiny function is compiled and run on the device, so that a machine
that cannot compile (no C++ compiler for CPU code, a torch without a working inductor) stops the run at start-up
with one clear error rather than at its first step.
"""

from __future__ import annotations

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


def compiled_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules `compile_blocks` compiles: each block's norms, attention and dense FFN."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"compile needs a decoder with `blocks`, got {type(model).__name__}")
    out = []
    for block in blocks:
        out += [block.attn_norm, block.attn, block.ffn_norm]
        if not isinstance(block.ffn, MoELayer):
            out.append(block.ffn)
    return out


def compile_blocks(model: nn.Module, device: torch.device) -> list[nn.Module]:
    """Check that `device` can compile, then compile the modules `compiled_modules` names, in place."""
    check_compile(device)
    modules = compiled_modules(model)
    for module in modules:
        module.compile(dynamic=False)
    return modules
