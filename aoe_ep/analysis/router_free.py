"""Router-free expert selection in a pretrained routed MoE (AoE paper, Section 3.1, Table 1 and App. A).

The routers of a Mixtral-format model (transformers' `MixtralForCausalLM`) are removed from the decision: in every
MoE layer *every* expert processes each token up to a "pause" node of its SwiGLU, `E_i(x) = (SiLU(x Wg) ⊙ x Wp) Wo`
(Eq. 1), the experts are ranked by the norm of their activation there (L2, L1 or L∞), and only the top-K continue
from the pause node to their output. Nodes: `xWg`, `xWp`, `silu_xWg`, `silu_xWg_xWp` and `output` (the expert's
final output, all experts run to the end); `router` is the checkpoint as trained (transformers' own MoE block).

The gate weights of the K chosen experts are the softmax of their norms (AoE's rule, `softmax_topk`), or equal
(`uniform`). The router's weights stay in the model only to report how often its top-K agrees with the chosen set.

With `d_low` = R every expert's W_g is replaced by its rank-R factors W_down W_up (`aoe_ep.model.lowrank`, the
factorisation `aoe-ep import --to aoe --d-low R` writes) in every node, and one more node is open: `xWdown`, AoE's
cache x W_down [R]. At `xWdown` the layer is by construction the upcycled AoE layer: the same scores ‖x W_down‖, the
same top-K, the same softmax gates over the K chosen norms, the same experts (SiLU(x W_down W_up) ⊙ x W_p) W_o.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from aoe_ep.model.lowrank import factorise
from aoe_ep.moe.scorers import activation_norm
from aoe_ep.moe.selection import top_k_order

NODES = ("xWg", "xWp", "silu_xWg", "silu_xWg_xWp", "output")
ALL_NODES = NODES + ("router",)
LOW_RANK_NODE = "xWdown"  # AoE's cache x W_down: only with d_low
GATES = ("softmax", "uniform")


@dataclass
class SelectionTally:
    """Per layer: tokens seen, Σ |chosen ∩ router's top-K| / K, and how many tokens each expert was chosen for."""

    tokens: int = 0
    agreement: float = 0.0
    chosen_per_expert: Optional[torch.Tensor] = None

    def add(self, chosen_TK: torch.Tensor, router_TK: torch.Tensor, num_experts: int) -> None:
        hits_TK = (chosen_TK[:, :, None] == router_TK[:, None, :]).any(-1)
        self.tokens += chosen_TK.shape[0]
        self.agreement += float(hits_TK.float().mean(-1).sum())
        counts = torch.bincount(chosen_TK.flatten(), minlength=num_experts).cpu()
        self.chosen_per_expert = counts if self.chosen_per_expert is None else self.chosen_per_expert + counts


def check_d_low(d_low: Optional[int], d_model: int, d_ffn: int) -> None:
    if d_low is not None and not (isinstance(d_low, int) and 0 < d_low <= min(d_model, d_ffn)):
        raise ValueError(f"--d-low {d_low}: must lie in [1, min(d_model={d_model}, d_ffn={d_ffn})]")


def _check_node(node: str, nodes: tuple[str, ...], d_low: Optional[int]) -> None:
    """`node` must be one of `nodes`, or `xWdown` when W_g is factorised (`d_low`)."""
    nodes = nodes + ((LOW_RANK_NODE,) if d_low is not None else ())
    if node not in nodes:
        hint = f" ({LOW_RANK_NODE} needs d_low)" if node == LOW_RANK_NODE else ""
        raise ValueError(f"node: {node!r} is not one of {', '.join(nodes)}{hint}")


class RouterFreeMoE(nn.Module):
    """Stands in for a `MixtralSparseMoeBlock`, with its weights: every expert runs to `node`, the top-K by the
    `norm` of that activation finish. `tally` records the agreement with the block's router. With `d_low`, each
    expert's W_g is its rank-`d_low` factors W_down W_up (the node `xWdown` then ranks by ‖x W_down‖)."""

    def __init__(self, block: nn.Module, node: str, norm: str, gate: str, d_low: Optional[int] = None):
        super().__init__()
        _check_node(node, NODES, d_low)
        if gate not in GATES:
            raise ValueError(f"gate: {gate!r} is not one of {', '.join(GATES)}")
        self.block, self.node, self.norm, self.gate = block, node, norm, gate
        self.top_k = block.gate.top_k
        self.tally = SelectionTally()
        self.w_down_EDR = self.w_up_ERF = None
        if d_low is not None:
            w_gate_EFD = block.experts.gate_up_proj.chunk(2, dim=1)[0]
            check_d_low(d_low, w_gate_EFD.shape[2], w_gate_EFD.shape[1])
            with torch.no_grad():
                parts = [factorise(w_FD.t(), d_low) for w_FD in w_gate_EFD]
            self.w_down_EDR = torch.stack([p[0] for p in parts])
            self.w_up_ERF = torch.stack([p[1] for p in parts])

    def gate_projection(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        """x W_g of expert e for the rows x_TD (W_g, or its factors W_down W_up under d_low)."""
        if self.w_down_EDR is not None:
            return x_TD @ self.w_down_EDR[e] @ self.w_up_ERF[e]
        return x_TD @ self.block.experts.gate_up_proj.chunk(2, dim=1)[0][e].T

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        experts = self.block.experts
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        w_gate_EFD, w_p_EFD = experts.gate_up_proj.chunk(2, dim=1)  # transformers stores [gate; up] rows
        w_o_EDF = experts.down_proj
        act = experts.act_fn
        # every expert, up to the pause node (the later parts only for the chosen experts, below)
        c_TER = None
        if self.w_down_EDR is not None:
            c_TER = torch.einsum("td,edr->ter", x_TD, self.w_down_EDR)
            g_TEF = torch.einsum("ter,erf->tef", c_TER, self.w_up_ERF) if self.node != "xWp" else None
        else:
            g_TEF = (x_TD @ w_gate_EFD.transpose(1, 2)).transpose(0, 1) if self.node != "xWp" else None
        p_TEF = (
            (x_TD @ w_p_EFD.transpose(1, 2)).transpose(0, 1)
            if self.node not in ("xWg", "silu_xWg", LOW_RANK_NODE)
            else None
        )
        if self.node == LOW_RANK_NODE:
            paused_TEW = c_TER
        elif self.node == "xWg":
            paused_TEW = g_TEF
        elif self.node == "xWp":
            paused_TEW = p_TEF
        elif self.node == "silu_xWg":
            paused_TEW = g_TEF = act(g_TEF)
        else:
            paused_TEW = h_TEF = act(g_TEF) * p_TEF
            if self.node == "output":
                paused_TEW = torch.bmm(h_TEF.transpose(0, 1), w_o_EDF.transpose(1, 2)).transpose(0, 1)
        s_TE = activation_norm(paused_TEW, self.norm)
        chosen_TK = top_k_order(s_TE, self.top_k)
        gates_TK = (
            torch.softmax(s_TE.gather(1, chosen_TK), dim=-1)
            if self.gate == "softmax"
            else torch.full(chosen_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        )
        with torch.no_grad():
            _, _, router_TK = self.block.gate(x_TD)
        self.tally.add(chosen_TK, router_TK, s_TE.shape[1])

        y_TD = torch.zeros_like(x_TD)
        for e in range(s_TE.shape[1]):
            rows, slot = torch.where(chosen_TK == e)
            if rows.numel() == 0:
                continue
            if self.node == "output":
                out_RD = paused_TEW[rows, e]
            else:
                if self.node in (LOW_RANK_NODE, "xWg", "xWp", "silu_xWg"):
                    g_RF = g_TEF[rows, e] if g_TEF is not None else self.gate_projection(x_TD[rows], e)
                    if self.node != "silu_xWg":
                        g_RF = act(g_RF)
                    p_RF = p_TEF[rows, e] if p_TEF is not None else x_TD[rows] @ w_p_EFD[e].T
                    h_RF = g_RF * p_RF
                else:
                    h_RF = paused_TEW[rows, e]
                out_RD = h_RF @ w_o_EDF[e].T
            y_TD.index_add_(0, rows, (out_RD * gates_TK[rows, slot, None]).to(y_TD.dtype))
        return y_TD.reshape(hidden_BSD.shape)


def moe_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(decoder layer, attribute) of every Mixtral MoE block: `mlp` in transformers >= 5."""
    found = []
    for layer in model.model.layers:
        block = getattr(layer, "mlp", None)
        if block is None or not hasattr(block, "gate") or not hasattr(getattr(block, "experts", None), "gate_up_proj"):
            raise ValueError(
                "not a Mixtral-format MoE model (transformers >= 5 layout: layer.mlp.gate and "
                "layer.mlp.experts.gate_up_proj / down_proj)"
            )
        found.append((layer, "mlp"))
    return found


class RouterTally(nn.Module):
    """Wraps the trained block unchanged (node `router`), recording its choices."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.tally = block, SelectionTally()

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, _, router_TK = self.block.gate(hidden_BSD.reshape(-1, hidden_BSD.shape[-1]))
        self.tally.add(router_TK, router_TK, self.block.gate.num_experts)
        return self.block(hidden_BSD)


@dataclass
class NodeResult:
    node: str
    norm: str
    d_low: Optional[int]  # the rank of the factorised W_g, or None (W_g as trained)
    loss: float
    perplexity: float
    tokens: int
    router_overlap: float  # mean over layers and tokens of |chosen ∩ router top-K| / K
    seconds: float
    load: list[list[float]] = field(default_factory=list)  # per layer: share of selections per expert

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Consecutive windows of seq_len + 1 tokens overlapping by one: every token after the first predicted once."""
    return [list(ids[i : i + seq_len + 1]) for i in range(0, len(ids) - 1, seq_len)]


@torch.no_grad()
def evaluate_node(
    model: nn.Module,
    ids: Sequence[int],
    node: str,
    norm: str = "l2",
    gate: str = "softmax",
    seq_len: int = 512,
    progress=None,
    d_low: Optional[int] = None,
) -> NodeResult:
    """Perplexity of `model` on the token ids with experts chosen at `node` (routers restored afterwards); with
    `d_low`, every W_g factorised at that rank (`router` is the checkpoint as trained whatever `d_low`)."""
    _check_node(node, ALL_NODES, d_low)
    blocks = moe_blocks(model)
    originals = [getattr(layer, attr) for layer, attr in blocks]
    wrappers = [RouterTally(b) if node == "router" else RouterFreeMoE(b, node, norm, gate, d_low) for b in originals]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    start = time.perf_counter()
    try:
        for (layer, attr), wrapper in zip(blocks, wrappers):
            setattr(layer, attr, wrapper)
        model.eval()
        for window in windows(ids, seq_len):
            ids_1S = torch.tensor([window], device=device)
            logits_SV = model(input_ids=ids_1S[:, :-1]).logits[0].float()
            total += float(F.cross_entropy(logits_SV, ids_1S[0, 1:], reduction="sum"))
            count += len(window) - 1
            if progress is not None:
                progress.update(1)
    finally:
        for (layer, attr), block in zip(blocks, originals):
            setattr(layer, attr, block)
    seconds = time.perf_counter() - start
    tallies = [w.tally for w in wrappers]
    overlap = sum(t.agreement for t in tallies) / max(1, sum(t.tokens for t in tallies))
    load = [(t.chosen_per_expert.double() / t.chosen_per_expert.sum()).tolist() for t in tallies]
    loss = total / max(1, count)
    return NodeResult(
        node=node,
        norm=norm,
        d_low=None if node == "router" else d_low,
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        tokens=count,
        router_overlap=overlap,
        seconds=seconds,
        load=load,
    )


def load_mixtral(hf_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """`MixtralForCausalLM` from a local directory (no download)."""
    try:
        from transformers import MixtralForCausalLM
    except ImportError:
        raise ValueError(
            "router-free selection reads Mixtral checkpoints with transformers: pip install -e '.[eval]'"
        ) from None
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    model = MixtralForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def read_text_ids(text_path: Optional[str], tokenizer, max_bytes: int) -> list[int]:
    """Token ids of (the first `max_bytes` of) a text file; without one, of the *last* files of the standard
    library sources, in reverse order: their first `HELD_OUT_BYTES` (64 KiB) are the files the built-in corpus
    holds out, which no model trained on it has seen."""
    if text_path is not None:
        path = Path(text_path)
        if not path.is_file():
            raise ValueError(
                f"--text {text_path}: not a regular file (a device or pipe cannot be read as text)"
                if path.exists()
                else f"--text {text_path}: no such file"
            )
        text = path.read_bytes()[:max_bytes].decode("utf-8", errors="ignore")
    else:
        import sysconfig

        from aoe_ep.data.default_corpus import library_sources

        root = Path(sysconfig.get_paths()["stdlib"])
        parts, size = [], 0
        for rel, _ in reversed(library_sources(root)):
            parts.append((root / rel).read_bytes())
            size += len(parts[-1])
            if size >= max_bytes:
                break
        text = b"".join(parts)[:max_bytes].decode("utf-8", errors="ignore")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to predict")
    return ids
