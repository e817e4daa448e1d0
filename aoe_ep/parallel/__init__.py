"""Token movement between the layer and its experts: the local dispatcher now, expert-parallel ones next to it."""

from aoe_ep.parallel.local import DispatchState, ExpertRows, LocalDispatcher

__all__ = ["DispatchState", "ExpertRows", "LocalDispatcher"]
