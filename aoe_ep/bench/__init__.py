"""Benchmarks run as `aoe-ep bench ...`: ratios measured side by side, next to their cost-model bounds."""
