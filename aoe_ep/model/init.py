"""Layout-invariant initialisation: one seed, one model, whatever the EP, DP, dense sharding or node count.

Every parameter is drawn from its own generator, seeded by (seed, the parameter's fully-qualified name), and
stacked-expert tensors ([E, ...], dim 0 the expert) by (seed, name, global expert index): a rank holding experts
[o, o + E_local) draws exactly those, so an expert starts the same under any expert-parallel size and no two experts
repeat each other. Nothing depends on how many parameters were drawn before, so the dense weights built after an
expert-parallel layer no longer depend on the size of that layer's (sharded) expert tensors. A stack that is
replicated instead of sharded (AoE's Wdown under the `alltoall` dispatcher) is drawn for all experts with the same
per-expert generators, so it equals the `allgather` shards side by side.

Draws are made on the CPU and copied to the parameter's device, so the values do not depend on the device either.
The distributions are the layers' own (std = fan_in^-0.5, embeddings 0.02, norms 1); `RULES` names them per module
type, and a parameter of a module type it does not know is an error rather than a silently different model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from aoe_ep.hashing import digest63
from aoe_ep.model.ffn import DenseSwiGLU
from aoe_ep.moe import MoELayer
from aoe_ep.moe.experts import AoEExperts, SwiGLUExperts
from aoe_ep.moe.layer import THRESHOLD_BIAS_INIT
from aoe_ep.moe.scorers import AoEScorer, RouterScorer

# How a parameter starts: a std from its shape (a normal draw), or None for ones.
Std = Optional[Callable[[torch.Size], float]]


def _fan_in(dim: int) -> Callable[[torch.Size], float]:
    return lambda shape: shape[dim] ** -0.5


# (module type, parameter name) -> (std rule, whether dim 0 is the expert index). Linear weights are [out, in],
# the decoder's own matrices [in, out], stacked experts [E, in, out].
RULES: dict[tuple[type, str], tuple[Std, bool]] = {
    (nn.Embedding, "weight"): (lambda shape: 0.02, False),
    (nn.Linear, "weight"): (_fan_in(1), False),
    (nn.RMSNorm, "weight"): (None, False),
    (DenseSwiGLU, "w_gate"): (_fan_in(0), False),
    (DenseSwiGLU, "w_p"): (_fan_in(0), False),
    (DenseSwiGLU, "w_o"): (_fan_in(0), False),
    (RouterScorer, "weight"): (_fan_in(1), False),
    (RouterScorer, "w_hidden"): (_fan_in(0), False),
    (AoEScorer, "w_down"): (_fan_in(1), True),
    (SwiGLUExperts, "w_gate"): (_fan_in(1), True),
    (SwiGLUExperts, "w_p"): (_fan_in(1), True),
    (SwiGLUExperts, "w_o"): (_fan_in(1), True),
    (AoEExperts, "w_down"): (_fan_in(1), True),
    (AoEExperts, "w_up"): (_fan_in(1), True),
    (AoEExperts, "w_p"): (_fan_in(1), True),
    (AoEExperts, "w_o"): (_fan_in(1), True),
}
# (module type, parameter name) -> the constant it starts at: threshold selection's b (Routing-Free MoE's 1e-6).
CONSTANTS: dict[tuple[type, str], float] = {
    (MoELayer, "threshold_bias"): THRESHOLD_BIAS_INIT,
}


def stable_seed(*parts) -> int:
    """63 bits of SHA-256 of the parts joined by '/' (Python's `hash` of a str is salted per process)."""
    data = "/".join(str(part) for part in parts).encode()
    return digest63(data)


def _draw(shape, std: float, *key) -> torch.Tensor:
    gen = torch.Generator().manual_seed(stable_seed(*key))
    return torch.randn(shape, generator=gen, device="cpu").mul_(std)


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of `model` (before any DDP/FSDP wrapping) with its layout-invariant initial value."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            fqn = f"{module_name}.{pname}" if module_name else pname
            constant = next((c for (kind, n), c in CONSTANTS.items() if isinstance(module, kind) and n == pname), None)
            if constant is not None:
                p.fill_(constant)
                continue
            rule = next((r for (kind, n), r in RULES.items() if isinstance(module, kind) and n == pname), None)
            if rule is None:
                raise TypeError(
                    f"init_parameters: no initialisation rule for {fqn} ({type(module).__name__}."
                    f"{pname}); add one to aoe_ep.model.init.RULES"
                )
            std_of, per_expert = rule
            if std_of is None:
                p.fill_(1.0)
                continue
            std = std_of(p.shape)
            if not per_expert:
                p.copy_(_draw(p.shape, std, seed, fqn))
                continue
            layer = next((m for name, m in layers.items() if module_name.startswith(f"{name}." if name else "")), None)
            if layer is None:
                raise TypeError(f"init_parameters: {fqn} is a stacked-expert tensor outside an MoELayer")
            # An expert-parallel stack holds this rank's experts, in the order of the layer's placement.
            held = layer.held_experts if getattr(p, "expert_parallel", False) else range(p.shape[0])
            for local, expert in enumerate(held):
                p[local].copy_(_draw(p.shape[1:], std, seed, fqn, expert))
