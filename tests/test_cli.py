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
