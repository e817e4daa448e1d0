"""The balancing schemes of the MoE layer, one small object each, chosen once from the config.

A scheme owns its state (it registers it on the layer, under the names checkpoints use), its part of the
selection (a bias on the decision's scores, or threshold selection's gates), its loss, its update after every
applied optimiser step and the values it logs. The layer calls every scheme the same way, so adding one touches
this file (its class and `build_balancing`) and the config:

    AuxLoss              `moe.balance: aux` / `none`: the load-balancing loss (weight 0 under `none`) and top-P's
                         entropy term (aoe_ep/moe/losses.py); no state.
    BiasBalancing        `moe.balance: bias`: DeepSeek-V3's per-expert bias `expert_bias` on the decision's scores,
                         moved from the step's counts (aoe_ep/moe/balance.py).
    ThresholdBalancing   `moe.selection: threshold`: Routing-Free MoE's gates G = relu(s − b) with the learned
                         `threshold_bias` b, its loss λ·L_LB and λ (`threshold_lambda`) moved from the step's density
                         (aoe_ep/moe/threshold.py).
    ExpertRouterCoupling `moe.erc_loss_coeff > 0`, on top of any of the three: the ERC loss of a learned router
                         (aoe_ep/moe/losses.py), which runs inside the experts' call.

Per-step updates read the step's global counts (`update_balancing`); the layer never sees ranks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

from aoe_ep.config import MoEConfig
from aoe_ep.moe.balance import bias_update
from aoe_ep.moe.context import StepContext
from aoe_ep.moe.losses import aux_loss, erc_eps, erc_from_norms, erc_noise, erc_proxies, threshold_balance_loss
from aoe_ep.moe.routing import Decision
from aoe_ep.moe.selection import decide, threshold_gates
from aoe_ep.moe.stats import BatchSums, LoadStats
from aoe_ep.moe.threshold import lambda_update, step_density

THRESHOLD_BIAS_INIT = 1e-6  # Routing-Free MoE's initial b

ExpertChoice = Callable[[torch.Tensor], Decision]


class Balancing(abc.ABC):
    """The interface the layer calls, with the behaviour of a scheme that adds nothing to the selection; `loss` is
    each scheme's own. `updates_per_step`: whether `update` needs the step's global counts."""

    updates_per_step = False

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg

    def register(self, layer: nn.Module) -> None:
        """Create this scheme's parameters and buffers on `layer` (their names are state-dict keys)."""

    def decide(self, layer: nn.Module, s_SE: torch.Tensor, expert_choice: ExpertChoice) -> Decision:
        """The selection decision from the scores of all n experts (no gradient)."""
        return decide(s_SE, self.cfg, expert_choice=expert_choice)

    def gates(self, layer: nn.Module, s_SE: torch.Tensor) -> Optional[torch.Tensor]:
        """Gates that replace `cfg.gate`'s on the selected pairs (differentiable), or None."""
        return None

    def ranked(self, layer: nn.Module, s_dec_SE: torch.Tensor, g_SE: Optional[torch.Tensor]) -> torch.Tensor:
        """The scores the decision ranked (for the selection margin)."""
        return s_dec_SE

    @abc.abstractmethod
    def loss(
        self,
        layer: nn.Module,
        own: slice,
        mask_SE: torch.Tensor,
        probs_SE: torch.Tensor,
        entropy_S: torch.Tensor,
        g_SE: Optional[torch.Tensor],
        sums: BatchSums,
    ) -> torch.Tensor:
        """The balancing loss over the EP group's batch, differentiable through this rank's rows `own`."""

    def update(self, layer: nn.Module, counts_E: torch.Tensor, num_tokens: torch.Tensor | float) -> None:
        """Move the scheme's state after an applied optimiser step, from the step's global expert counts [n] and
        token count."""

    def log_values(self, layer: nn.Module, stats: Optional[LoadStats]) -> dict[str, float | list[float]]:
        """Values to log for this layer, by bare name (the caller names the layer); `stats`: the logging window's
        `LoadStats` of the layer, if any."""
        return {}


class AuxLoss(Balancing):
    """`moe.balance: aux` (or `none`, whose load-balancing weight is 0): `aoe_ep.moe.losses.aux_loss`."""

    def loss(self, layer, own, mask_SE, probs_SE, entropy_S, g_SE, sums):
        return aux_loss(self.cfg, probs_SE[own], entropy_S[own], sums)


class BiasBalancing(AuxLoss):
    """`moe.balance: bias`: top-K ranks s + b (top-P the softmax of s + b); gates and losses keep the unbiased s (the
    loss is top-P's entropy term only). b moves by `bias_update` after every applied step."""

    updates_per_step = True

    def register(self, layer):
        # Replicated on every rank, moved from the step's global counts; no gradient.
        layer.register_buffer("expert_bias", torch.zeros(self.cfg.num_experts))

    def decide(self, layer, s_SE, expert_choice):
        return decide(s_SE, self.cfg, expert_choice=expert_choice, bias_E=layer.expert_bias)

    def ranked(self, layer, s_dec_SE, g_SE):
        return s_dec_SE.detach() + layer.expert_bias

    @torch.no_grad()
    def update(self, layer, counts_E, num_tokens):
        layer.expert_bias.copy_(bias_update(layer.expert_bias, counts_E, self.cfg.balance_rate))

    def log_values(self, layer, stats):
        bias_E = layer.expert_bias.detach().cpu()
        return {"bias": bias_E.tolist(), "bias_max_abs": float(bias_E.abs().max())}


class ThresholdBalancing(Balancing):
    """`moe.selection: threshold`: expert i fires when G_i = relu(s_i − b_i) exceeds `moe.threshold`; the gates are
    G; the loss is λ·L_LB (0 under `moe.balance: none`), λ moved toward the target density after every step."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.updates_per_step = cfg.balance == "aux"

    def register(self, layer):
        # b is replicated like the router, its gradient from this rank's uses; λ is moved from the step's density.
        layer.threshold_bias = nn.Parameter(torch.full((self.cfg.num_experts,), THRESHOLD_BIAS_INIT))
        layer.register_buffer("threshold_lambda", torch.tensor(float(self.cfg.threshold_lambda_init)))

    def decide(self, layer, s_SE, expert_choice):
        return decide(s_SE, self.cfg, threshold_bias_E=layer.threshold_bias)

    def gates(self, layer, s_SE):
        return threshold_gates(s_SE, layer.threshold_bias)

    def ranked(self, layer, s_dec_SE, g_SE):
        return g_SE

    def loss(self, layer, own, mask_SE, probs_SE, entropy_S, g_SE, sums):
        return layer.threshold_lambda.to(g_SE.dtype) * threshold_balance_loss(self.cfg, g_SE[own], mask_SE[own], sums)

    @torch.no_grad()
    def update(self, layer, counts_E, num_tokens):
        if not self.updates_per_step:
            return
        density = step_density(counts_E.unsqueeze(0), num_tokens)[0]
        layer.threshold_lambda.copy_(
            lambda_update(layer.threshold_lambda, density, self.cfg.threshold_density, self.cfg.threshold_eta)
        )

    def log_values(self, layer, stats):
        out = {}
        if stats is not None:
            out["density"] = float(stats.tokens_per_expert.sum()) / max(
                stats.tokens_per_expert.numel() * stats.num_tokens, 1
            )
        out["threshold_lambda"] = float(layer.threshold_lambda)
        return out


class ExpertRouterCoupling:
    """The ERC loss (weight `moe.erc_loss_coeff`, margin `moe.erc_alpha`) of a learned router, in training only.
    Its noise comes from (run seed, layer index, step), so it is the same on every rank and after a resume."""

    def __init__(self, cfg: MoEConfig):
        self.coeff, self.alpha = cfg.erc_loss_coeff, cfg.erc_alpha

    def proxies(self, layer: nn.Module, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The proxies R̃ [n, d] of the router rows (differentiable in R) and ε [n]; the experts return their
        columns of M = ‖R̃ W_g‖ with their outputs."""
        router_nd = layer.scorer.weight
        u_nd = erc_noise(*router_nd.shape, ctx.seed, layer.index, ctx.step).to(router_nd.device)
        eps_n = erc_eps(router_nd)
        return erc_proxies(router_nd, eps_n, u_nd), eps_n

    def loss(self, expert_columns: Callable[[torch.Tensor], torch.Tensor], m_nX: torch.Tensor) -> torch.Tensor:
        """L_ERC (before its weight) from this rank's columns of M, gathered over all experts by `expert_columns`."""
        return erc_from_norms(expert_columns(m_nX), self.alpha)


def build_balancing(cfg: MoEConfig) -> Balancing:
    """The balancing scheme of `cfg`."""
    if cfg.selection == "threshold":
        return ThresholdBalancing(cfg)
    if cfg.balance == "bias":
        return BiasBalancing(cfg)
    return AuxLoss(cfg)


def build_coupling(cfg: MoEConfig) -> Optional[ExpertRouterCoupling]:
    """The ERC scheme of `cfg`, or None when `moe.erc_loss_coeff` is 0."""
    return ExpertRouterCoupling(cfg) if cfg.erc_loss_coeff > 0 else None


def needs_step_counts(layers: Sequence[nn.Module]) -> bool:
    """Whether any layer's scheme moves its state from the step's global counts (`update_balancing`)."""
    return any(layer.balancing.updates_per_step for layer in layers)


@torch.no_grad()
def update_balancing(layers: Sequence[nn.Module], counts_LE: torch.Tensor, num_tokens: torch.Tensor | float) -> None:
    """After an applied optimiser step: each layer's scheme moves its state from the step's global counts [L, n] of
    every layer in `layers` and the step's global token count (every layer sees the same tokens)."""
    for layer, counts_E in zip(layers, counts_LE):
        layer.balancing.update(layer, counts_E, num_tokens)
