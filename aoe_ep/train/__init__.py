"""Training: the loop, optimizer and schedule, data-parallel wrapping, checkpoints, metrics.

Import `aoe_ep.train.trainer` for `Trainer` / `train`; this package file stays light so that `aoe-ep --help` is fast.
"""
