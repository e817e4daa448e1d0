"""Token movement across ranks: the allgather and alltoall expert-parallel dispatchers, registered with the layer's
dispatcher factory (`aoe_ep.moe.dispatcher.build_dispatcher`), and their collectives."""

from aoe_ep.moe.dispatcher import (
    CommCounter,
    DispatchState,
    ExpertRows,
    LocalDispatcher,
    TokenLayout,
    register_dispatcher,
)
from aoe_ep.parallel.allgather import AllGatherDispatcher
from aoe_ep.parallel.alltoall import AllToAllDispatcher

register_dispatcher("allgather", AllGatherDispatcher)
register_dispatcher("alltoall", AllToAllDispatcher)

__all__ = [
    "AllGatherDispatcher",
    "AllToAllDispatcher",
    "CommCounter",
    "DispatchState",
    "ExpertRows",
    "LocalDispatcher",
    "TokenLayout",
]
