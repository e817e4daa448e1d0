"""megatron-core, imported with the warnings it gives at import time on a machine without Transformer Engine or apex
(expected on CPU: it falls back to torch) silenced for that import only. Modules that use megatron-core import this
one first; the process's warning filters are left as they were."""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*apex.*not installed.*", category=UserWarning)
    import megatron.core  # noqa: F401
