from aoe_ep.cli import main


def test_params_prints_the_paper_counts(capsys):
    assert main(["params", "paper/moe_732m", "paper/aoe_4b"]) == 0
    out = capsys.readouterr().out
    assert "paper/moe_732m: total 732.5M, active 247.4M" in out
    assert "paper/aoe_4b: total 3,973.6M, active 1,183.1M" in out


def test_config_error_is_one_line_and_exit_code_2(capsys):
    assert main(["params", "tiny", "--set", "moe.top_k=99"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "aoe-ep: config error: moe.top_k: top_k=99 exceeds num_experts=4"


def test_plan_prints_a_table_over_ep_and_json_fields(capsys):
    import json

    assert main(["plan", "paper/aoe_4b", "--dp", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in "1248"]
    assert [r[0] for r in rows] == ["1", "2", "4", "8"] and all(r[1] == "2" for r in rows)
    assert "TFLOP/s bf16" in out and "NVLink" in out

    assert main(["plan", "paper/aoe_4b", "--ep", "4", "--dp", "2", "--hot-expert-share", "0.4", "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    fields = {
        "ep",
        "dp",
        "params_dense",
        "params_expert",
        "bytes_weights",
        "bytes_grads",
        "bytes_optimizer",
        "bytes_activations",
        "bytes_total",
        "flops_per_step",
        "comm_bytes_per_step",
        "step_seconds",
        "fits",
    }
    assert fields <= set(plan) and plan["ep"] == 4 and plan["dp"] == 2
    assert {"compute", "memory", "intra_node", "inter_node", "total"} <= set(plan["step_seconds"])
    assert (
        plan["comm_bytes_per_step"]["ep.dispatch/fwd"] > 0 and "dp.allreduce_grads/dense" in plan["comm_bytes_per_step"]
    )


def test_plan_bad_input_is_one_line_and_exit_code_2(capsys):
    for argv, message in (
        (["--ep", "3"], "--ep: moe.num_experts=8 is not divisible by 3"),
        (["--hot-expert-share", "0.7"], "--hot-expert-share must lie in (0, 1/top_k = 0.5]"),
        (["--micro-batch", "0"], "--micro-batch: must be a positive integer"),
        (["--gpu", "v100"], "--gpu: 'v100' is not one of a100, h100, h200"),
        (["--dp", "3", "--ep", "1"], "train.global_batch_tokens"),
    ):
        assert main(["plan", "paper/aoe_4b", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("aoe-ep: config error: ") and message in err, err
