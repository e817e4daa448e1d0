"""aoe-ep: expert-parallel training of Autonomy-of-Experts, Self-Routing and routed MoE language models."""

import warnings as _warnings

# megatron-core warns at import time when neither Transformer Engine nor apex is installed; on CPU that is expected.
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
_warnings.filterwarnings("ignore", message=".*apex.*not installed.*", category=UserWarning)

__version__ = "0.1.0"
