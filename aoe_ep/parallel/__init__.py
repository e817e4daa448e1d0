"""Token movement between the layer and its experts: the local dispatcher and the two expert-parallel ones."""

from aoe_ep.parallel.allgather import AllGatherDispatcher
from aoe_ep.parallel.alltoall import AllToAllDispatcher
from aoe_ep.parallel.collectives import CommCounter
from aoe_ep.parallel.local import DispatchState, ExpertRows, LocalDispatcher, TokenLayout

__all__ = ["AllGatherDispatcher", "AllToAllDispatcher", "CommCounter", "DispatchState", "ExpertRows",
           "LocalDispatcher", "TokenLayout"]
