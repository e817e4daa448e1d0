"""`aoe-ep bench dispatch` runs end to end on a tiny layer; bytes at EP=1 are zero and grow with EP."""

import yaml

from aoe_ep.bench.dispatch import main


def test_bench_dispatch_tiny(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"tokens_per_rank": 16, "ep_sizes": [1, 2],
                                    "layer": {"d_model": 16, "d_ffn": 8, "d_low": 4, "num_experts": 4, "top_k": 2}}))
    results = main(str(spec), None, iters=1, ep_sizes=None, out=None)
    out = capsys.readouterr().out
    assert "allgather / alltoall" in out
    by = {(r["scorer"], r["ep"], r["dispatcher"]): r for r in results}
    assert by[("aoe", 1, "allgather")]["fwd_bytes_per_token"] == 0
    alltoall = by[("aoe", 2, "alltoall")]
    # only the per-step constants and routed rows are counted: at most every token's K rows of d + d_low (+ d back)
    assert 0 < alltoall["fwd_bytes_per_token"] <= 2 * (16 + 4 + 16) * 4 + 200
    assert by[("router", 2, "allgather")]["fwd_bytes_per_token"] >= 16 * 4  # every token is gathered
