"""Evaluation: checkpoints opened for inference, perplexity (`aoe-ep eval`), generation with a KV cache
(`aoe-ep generate`) and the lm-evaluation-harness model `aoe-ep` (`aoe_ep.eval.harness`, needs `.[eval]`)."""
