"""`aoe-ep bench dispatch` runs end to end on a tiny layer; bytes at EP=1 are zero and grow with EP; both `alltoall`
routes are measured side by side, and a named case of the spec runs after the main one."""

import pytest
import yaml

from aoe_ep.bench.dispatch import main


def test_bench_dispatch_tiny(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "tokens_per_rank": 16,
                "ep_sizes": [1, 2],
                "rounds": 2,
                "layer": {"d_model": 16, "d_ffn": 8, "d_low": 4, "num_experts": 4, "top_k": 2},
                "cases": {
                    "wide": {
                        "tokens_per_rank": 8,
                        "ep_sizes": [2],
                        "layer": {"d_model": 16, "d_ffn": 8, "d_low": 4, "num_experts": 8, "top_k": 4},
                    }
                },
            }
        )
    )
    results = main(str(spec), None, iters=1, ep_sizes=None, out=None)
    out = capsys.readouterr().out
    assert "allgather / alltoall" in out and "alltoall rank / pair" in out and "case wide" in out
    by = {(r["case"], r["scorer"], r["ep"], r["dispatcher"], r["route"]): r for r in results}
    assert len(by) == len(results) == 2 * 3 * 2 + 2 * 3
    assert by[("main", "aoe", 1, "allgather", None)]["fwd_bytes_per_token"] == 0
    assert by[("main", "aoe", 1, "alltoall", "rank")]["fwd_bytes_per_token"] == 0
    assert all(len(r["round_seconds"]) == 2 for r in results)
    for route in ("rank", "pair"):
        alltoall = by[("main", "aoe", 2, "alltoall", route)]
        # the per-step constants and routed rows: at most every token's K rows of d + d_low (+ d back) + metadata
        assert 0 < alltoall["fwd_bytes_per_token"] <= 2 * (16 + 4 + 16) * 4 + 200
    assert by[("main", "router", 2, "allgather", None)]["fwd_bytes_per_token"] >= 16 * 4  # every token is gathered
    # 8 experts top-4 at EP 2: a token's 4 experts reach at most 2 ranks, so the rank route moves fewer token rows
    wide = {route: by[("wide", "router", 2, "alltoall", route)] for route in ("rank", "pair")}
    assert wide["rank"]["fwd_bytes_per_token"] < wide["pair"]["fwd_bytes_per_token"]


def test_bench_dispatch_rejects_an_incomplete_case(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"tokens_per_rank": 16, "ep_sizes": [1], "layer": {"d_model": 16}, "cases": {"broken": {"ep_sizes": [2]}}}
        )
    )
    with pytest.raises(ValueError, match="case 'broken' lacks"):
        main(str(spec), None, iters=1, ep_sizes=None, out=None)
