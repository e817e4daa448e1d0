"""Checks that need a CUDA device (marked `gpu`; skipped without one). `launch/gpu_check.sh` runs them.

- the layer on CUDA in fp32 equals the CPU float64 layer (which the per-token reference holds);
- the local layer makes no host synchronisation in bf16 (`torch.cuda.set_sync_debug_mode("error")`);
- the grouped GEMM on CUDA equals the per-expert loop, misaligned hidden widths included;
- a bf16 training step, and a world-size-1 NCCL run of the trainer.
"""

import copy

import pytest
import torch

from aoe_ep.config import MoEConfig
from aoe_ep.moe import MoELayer, StepContext
from aoe_ep.moe.experts import grouped_glu
from aoe_ep.moe.grouped import Groups, gmm, gmm_wgrad

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SCORERS = ("aoe", "router", "self_routing")
DIMS = dict(d_model=64, num_experts=8, top_k=2, d_ffn=64, d_low=16, d_wide=72, aux_loss_coeff=0.05)


def _run(layer, x, g):
    x = x.clone().requires_grad_()
    y, info = layer(x)
    ((y.double() * g).sum() + info.aux_loss.double()).backward()
    return (
        y.double().cpu(),
        info,
        x.grad.double().cpu(),
        {n: p.grad.double().cpu() for n, p in layer.named_parameters()},
    )


@pytest.mark.parametrize("selection", ["top_k", "top_p", "expert_choice"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_cuda_fp32_layer_matches_cpu_float64(scorer, selection):
    torch.manual_seed(0)
    ref = MoELayer(MoEConfig(scorer=scorer, selection=selection, **DIMS)).double()
    cuda = copy.deepcopy(ref).float().cuda()
    x = torch.randn(96, DIMS["d_model"], dtype=torch.float64)
    g = torch.randn_like(x)
    y_ref, info_ref, dx_ref, grads_ref = _run(ref, x, g)
    y, info, dx, grads = _run(cuda, x.float().cuda(), g.cuda())
    assert torch.equal(info.stats.tokens_per_expert.cpu(), info_ref.stats.tokens_per_expert)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("selection", ["top_k", "expert_choice"])
@pytest.mark.parametrize("scorer", SCORERS)
def test_local_bf16_layer_never_synchronises(scorer, selection):
    layer = MoELayer(MoEConfig(scorer=scorer, selection=selection, **DIMS)).cuda().bfloat16()
    flag = StepContext(input_check="flag")  # "raise" on CUDA is an asynchronous assertion; training uses flag
    x = torch.randn(256, DIMS["d_model"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x, ctx=flag)  # warm-up outside the check (lazy CUDA initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, info = layer(x, ctx=flag)
        (y.float().sum() + info.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert x.grad is not None and int(info.nonfinite_inputs) == 0


@pytest.mark.parametrize("width", [64, 6470])
def test_cuda_grouped_gemm_matches_loop(width):
    counts = [5, 0, 17, 1]
    groups = Groups(torch.tensor(counts, device="cuda"))
    a = torch.randn(sum(counts), 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
    for fn, args in ((gmm, (a, w)), (gmm_wgrad, (a, b))):
        torch.testing.assert_close(
            fn(*args, groups, "grouped").float(), fn(*args, groups, "loop").float(), rtol=2e-2, atol=2e-2
        )
    ws = [
        torch.randn(4, 64, width, device="cuda", dtype=torch.bfloat16) * 0.1,
        torch.randn(4, 64, width, device="cuda", dtype=torch.bfloat16) * 0.1,
        torch.randn(4, width, 64, device="cuda", dtype=torch.bfloat16) * 0.1,
    ]
    outs = {k: grouped_glu(a, a, *ws, groups, k).float() for k in ("grouped", "loop")}
    torch.testing.assert_close(outs["grouped"], outs["loop"], rtol=3e-2, atol=3e-2)


def test_bf16_training_step_and_world_of_one_on_nccl(tmp_path):
    # a plain `train` on CUDA initialises a world of one on NCCL (aoe_ep/parallel/runtime.py)
    from aoe_ep.train.trainer import train
    from tests.train.synthetic import BUILDERS, small_config

    cfg = small_config(
        tmp_path, "train.device=cuda", "train.precision=bf16", "train.max_steps=8", "train.eval_interval=4"
    )
    result = train(cfg, data=BUILDERS)
    losses = [r.loss for r in result.history]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.distributed.is_initialized()  # the trainer tore its group down
