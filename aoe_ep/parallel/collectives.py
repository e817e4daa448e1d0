"""Collectives with a correct backward and a byte counter, over an explicit process group.

all-gather (uneven, dim 0)  <->  reduce-scatter;  all-to-all (uneven splits)  <->  the reverse all-to-all.
Bytes are counted as what this rank sends to other ranks (its own chunk is not counted), forward and backward
separately, per collective name; `parallel/comm_model.py` predicts the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from aoe_ep.moe.dispatcher import CommCounter

__all__ = [
    "CommCounter",
    "all_gather_rows",
    "all_gather_sizes",
    "all_reduce_sum",
    "all_to_all_counts",
    "all_to_all_rows",
    "attach_gathered",
    "all_gather_shared",
]


def _nbytes(rows: int, t: torch.Tensor) -> int:
    row_elems = 1
    for size in t.shape[1:]:
        row_elems *= size
    return rows * row_elems * t.element_size()


def all_gather_sizes(
    n: int, nonfinite: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter
) -> tuple[list[int], list[int]]:
    """Every rank's row count (needed before an uneven all-gather) and its count of non-finite input values, in one
    all-gather: the check's verdict reaches every rank at the same point, before any other collective."""
    world = dist.get_world_size(group)
    mine = torch.stack([torch.tensor(n, dtype=torch.int64, device=nonfinite.device), nonfinite.to(torch.int64)])
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    counter.add("sizes", "fwd", (world - 1) * mine.numel() * mine.element_size())
    pairs = torch.stack(out).tolist()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _gather_rows(x: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's rows; pads to the largest chunk because gloo's all_gather wants equal shapes."""
    biggest = max(sizes)
    padded = x.new_zeros((biggest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([chunk[:n] for chunk, n in zip(out, sizes)])


def _all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=list(recv), input_split_sizes=list(send), group=group
    )
    return out


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, counter, name):
        ctx.sizes, ctx.group, ctx.counter, ctx.name = sizes, group, counter, name
        ctx.rank = dist.get_rank(group)
        counter.add(name, "fwd", (len(sizes) - 1) * _nbytes(x.shape[0], x))
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # reduce-scatter: this rank's rows receive the sum of every rank's gradient for them. Done as an
        # all-to-all of row blocks plus a local sum, so that uneven sizes need no padding.
        sizes, group = ctx.sizes, ctx.group
        world, mine = len(sizes), sizes[ctx.rank]
        grad = grad.contiguous()
        received = _all_to_all(grad, send=sizes, recv=[mine] * world, group=group)
        sent = sum(n for r, n in enumerate(sizes) if r != ctx.rank)
        ctx.counter.add(ctx.name, "bwd", _nbytes(sent, grad))
        out = received.view((world, mine) + tuple(grad.shape[1:])).sum(dim=0)
        return out, None, None, None, None


class _AttachGathered(torch.autograd.Function):
    """The all-gather whose result is already known (gathered without gradient for a decision): forward returns it
    and sends nothing; backward is the all-gather's reduce-scatter."""

    @staticmethod
    def forward(ctx, x, gathered, sizes, group, counter, name):
        ctx.sizes, ctx.group, ctx.counter, ctx.name = sizes, group, counter, name
        ctx.rank = dist.get_rank(group)
        return gathered.clone()

    @staticmethod
    def backward(ctx, grad):
        return _AllGatherRows.backward(ctx, grad)[0], None, None, None, None, None


class _AllGatherShared(torch.autograd.Function):
    """The all-gather whose result feeds a computation every rank repeats identically (the ERC loss from its
    gathered score matrix): every rank's gradient for the gathered tensor is the same, so backward takes this rank's
    rows of its own gradient and sends nothing. The reduce-scatter of `_AllGatherRows` would sum EP equal copies."""

    @staticmethod
    def forward(ctx, x, sizes, group, counter, name):
        rank = dist.get_rank(group)
        ctx.rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        counter.add(name, "fwd", (len(sizes) - 1) * _nbytes(x.shape[0], x))
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows].contiguous(), None, None, None, None


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group, counter, name):
        ctx.send, ctx.recv, ctx.group, ctx.counter, ctx.name = send, recv, group, counter, name
        rank = dist.get_rank(group)
        counter.add(name, "fwd", _nbytes(sum(n for r, n in enumerate(send) if r != rank), x))
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        grad = grad.contiguous()
        ctx.counter.add(ctx.name, "bwd", _nbytes(sum(n for r, n in enumerate(ctx.recv) if r != rank), grad))
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None, None, None


def all_gather_rows(
    x: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup, counter: CommCounter, name: str
) -> torch.Tensor:
    """[sizes[rank], ...] on each rank -> [sum(sizes), ...] on every rank, in rank order; backward reduce-scatters."""
    return _AllGatherRows.apply(x, list(sizes), group, counter, name)


def attach_gathered(
    x: torch.Tensor,
    gathered: torch.Tensor,
    sizes: Sequence[int],
    group: dist.ProcessGroup,
    counter: CommCounter,
    name: str,
) -> torch.Tensor:
    """`gathered` (= all_gather_rows(x) computed earlier without gradient) as a function of x: backward
    reduce-scatters, counted under `name` like the all-gather's own backward."""
    return _AttachGathered.apply(x, gathered.detach(), list(sizes), group, counter, name)


def all_gather_shared(
    x: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup, counter: CommCounter, name: str
) -> torch.Tensor:
    """`all_gather_rows` for a result every rank then differentiates identically: backward keeps this rank's rows
    of its own gradient (no communication), so that the rank's inputs get the single-device gradient."""
    return _AllGatherShared.apply(x, list(sizes), group, counter, name)


def all_to_all_rows(
    x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: dist.ProcessGroup, counter: CommCounter, name: str
) -> torch.Tensor:
    """Rows [sum(send), ...]: send[r] consecutive rows to rank r, receive recv[r] from rank r; backward reverses."""
    return _AllToAllRows.apply(x, list(send), list(recv), group, counter, name)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter, name: str) -> torch.Tensor:
    """Sum over the group, no gradient (statistics). Counted as the (world - 1) copies a rank contributes."""
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    counter.add(name, "fwd", (dist.get_world_size(group) - 1) * out.numel() * out.element_size())
    return out


def all_to_all_counts(counts: torch.Tensor, group: dist.ProcessGroup, counter: CommCounter) -> torch.Tensor:
    """counts [world, k] int64: row r goes to rank r; returns the [world, k] rows every rank sent to this one."""
    world = dist.get_world_size(group)
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    counter.add("counts", "fwd", (world - 1) * counts[0].numel() * counts.element_size())
    return out
