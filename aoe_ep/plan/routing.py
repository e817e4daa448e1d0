"""Expected routing of one EP group: uniform top-K, or one hot expert taking a given share of the routed rows.

Model (top-K token choice, every rank with T tokens): a token selects the hot expert 0 with probability h = S·K
(S: its share of the T·K rows) and its other choices uniformly among the other n − 1 experts. S = 1/n is uniform
top-K exactly (a uniform K-subset contains a given expert with probability K/n). From it the communication model's
pair counts follow: W[r][q] = T·(expected selections among rank q's experts), A[r][q] = T·P(a token of q selects
at least one of rank r's experts), U[r][q] = A[q][r]. Rank 0 holds the hot expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb


@dataclass(frozen=True)
class RoutingModel:
    """num_experts n, top_k K (for expert choice: n·C/T, the mean experts per token), hot_share S of the rows."""

    num_experts: int
    top_k: float
    hot_share: float

    @property
    def hot_probability(self) -> float:
        return self.hot_share * self.top_k

    def expert_share(self, expert: int) -> float:
        """Expected selections of `expert` per token (Σ over experts = K)."""
        h = self.hot_probability
        return h if expert == 0 else (self.top_k - h) / (self.num_experts - 1)

    def rank_rows_per_token(self, rank: int, ep: int) -> float:
        """Expected selections per token among rank `rank`'s experts."""
        n_local = self.num_experts // ep
        return sum(self.expert_share(e) for e in range(rank * n_local, (rank + 1) * n_local))

    def p_none(self, rank: int, ep: int) -> float:
        """P(a token selects none of rank `rank`'s experts)."""
        n, n_local, h = self.num_experts, self.num_experts // ep, self.hot_probability
        k = self.top_k
        if n == 1:
            return 0.0
        if not float(k).is_integer():  # expert choice: independent draws at the mean rate
            return (1.0 - k / n) ** n_local
        k = int(k)
        others = n - 1
        if rank == 0:  # holds the hot expert: a token avoids it (1 − h), then its K picks avoid the n_l − 1 others
            return (1.0 - h) * comb(others - (n_local - 1), k) / comb(others, k)
        with_hot = comb(others - n_local, k - 1) / comb(others, k - 1) if k >= 1 else 1.0
        without_hot = comb(others - n_local, k) / comb(others, k)
        return h * with_hot + (1.0 - h) * without_hot

    def pairs(self, dispatcher: str, tokens_per_rank: float, ep: int) -> list[list[float]]:
        """The pair counts `aoe_ep.parallel.comm_model.bytes_from_pairs` takes: A (allgather) or W (alltoall)."""
        if dispatcher == "alltoall":
            return [[tokens_per_rank * self.rank_rows_per_token(q, ep) for q in range(ep)] for _ in range(ep)]
        return [[tokens_per_rank * (1.0 - self.p_none(r, ep)) for _ in range(ep)] for r in range(ep)]

    def rank_pairs(self, tokens_per_rank: float, ep: int) -> list[list[float]]:
        """U of `bytes_from_pairs` (the `alltoall` rank combine): U[r][q] = T·P(a token of r selects at least one of
        rank q's experts)."""
        return [[tokens_per_rank * (1.0 - self.p_none(q, ep)) for q in range(ep)] for _ in range(ep)]


def routing_model(num_experts: int, top_k: float, hot_share: float | None) -> RoutingModel:
    """Uniform routing when `hot_share` is None; a ValueError for a share one expert cannot take."""
    if hot_share is None:
        return RoutingModel(num_experts, top_k, 1.0 / num_experts)
    if num_experts < 2:
        raise ValueError(f"--hot-expert-share needs at least 2 experts, the model has {num_experts}")
    if not 0.0 < hot_share <= min(1.0, 1.0 / top_k):
        raise ValueError(
            f"--hot-expert-share must lie in (0, 1/top_k = {1.0 / top_k:.4g}] (an expert is chosen "
            f"at most once per token), got {hot_share}"
        )
    return RoutingModel(num_experts, top_k, hot_share)
