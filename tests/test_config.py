import math

import pytest
import yaml

from aoe_ep.config import (
    ConfigError,
    MoEConfig,
    apply_overrides,
    config_from_dict,
    count_parameters,
    derive_d_wide,
    load_config,
)


@pytest.mark.parametrize(
    "d, d_ffn, d_low, expected",
    [
        (768, 3072, 256, 3840),  # exact
        (1280, 5120, 400, 6470),  # 6469.2, which the paper rounds to 6470
        (768, 3072, 512, 3264),
    ],
)
def test_d_wide_eq5(d, d_ffn, d_low, expected):
    assert derive_d_wide(d, d_ffn, d_low) == expected
    exact = (3 * d * d_ffn - d_low * d) / (d_low + 2 * d)
    assert expected - 1 < exact <= expected


def test_aoe_expert_has_moe_expert_parameter_count():
    cfg = MoEConfig(d_model=768, d_ffn=3072, d_low=256)
    aoe_expert = 768 * 256 + 256 * cfg.d_wide + 2 * 768 * cfg.d_wide
    assert aoe_expert == 3 * 768 * 3072


@pytest.mark.parametrize(
    "preset, total, active",
    [
        ("paper/moe_732m", 732e6, 247e6),
        ("paper/aoe_732m", 732e6, 247e6),
        ("paper/moe_4b", 4e9, 1.18e9),
        ("paper/aoe_4b", 4e9, 1.18e9),
    ],
)
def test_parameter_counts_match_the_paper(preset, total, active):
    count = count_parameters(load_config(preset))
    assert count.total == pytest.approx(total, rel=0.01)
    assert count.active == pytest.approx(active, rel=0.01)
    assert count.total_untied > count.total  # the head is a second vocabulary matrix


def test_paper_732m_count_worked_out():
    # 12 x (4 d^2 attention + 2 d norms + 8 x 3 d d_ffn experts + 8 d router) + 32000 d
    d, f, v = 768, 3072, 32000
    expected_total = 12 * (4 * d * d + 2 * d + 8 * 3 * d * f + 8 * d) + v * d
    expected_active = 12 * (4 * d * d + 2 * d + 2 * 3 * d * f + 8 * d) + 2 * v * d
    count = count_parameters(load_config("paper/moe_732m"))
    assert (count.total, count.active) == (expected_total, expected_active)


def test_aoe_counts_unselected_selectors_in_active_compute():
    count = count_parameters(load_config("paper/aoe_732m"))
    assert count.active_compute - count.active == 12 * (8 - 2) * 768 * 256


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(d_low=0), "d_low"),
        (dict(d_low=-3), "d_low"),
        (dict(norm="l3"), "norm"),
        (dict(selection="random"), "selection"),
        (dict(scorer="hash"), "scorer"),
        (dict(gate="sigmoid"), "gate"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(dispatcher="nccl"), "dispatcher"),
        (dict(num_experts=0), "num_experts"),
        (dict(scorer="self_routing", num_experts=8, d_model=4), "num_experts"),
        (dict(aux_loss_coeff=-1.0), "aux_loss_coeff"),
    ],
)
def test_invalid_moe_config_names_the_field(kwargs, field):
    base = dict(d_model=32, num_experts=8, top_k=2, d_ffn=16, d_low=8)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=rf"^moe\.{field}:"):
        MoEConfig(**base)


def test_yaml_overrides_and_derived_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": {"d_model": 64, "n_heads": 4}, "moe": {"num_experts": 4, "d_ffn": 32, "d_low": 8, "top_p": 1}}
        )
    )
    cfg = load_config(str(path), ["moe.top_k=1", "moe.selection=top_p", "model.n_layers=3"])
    assert cfg.moe.d_model == 64 and cfg.moe.top_k == 1 and cfg.moe.selection == "top_p"
    assert cfg.model.n_layers == 3 and cfg.moe.top_p == 1.0 and isinstance(cfg.moe.top_p, float)
    assert cfg.moe.d_wide == math.ceil((3 * 64 * 32 - 8 * 64) / (8 + 128))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"modle": {}}, r"^modle: unknown section"),
        ({"model": {"d_modle": 3}}, r"^model\.d_modle: unknown key"),
        ({"model": {"d_model": "big"}}, r"^model\.d_model: expected int"),
        ({"model": {"d_model": 64, "n_heads": 5}}, r"^model\.n_heads:"),
        ({"model": {"d_model": 64}, "moe": {"d_model": 32, "num_experts": 4}}, r"^moe\.d_model:"),
        (
            {
                "model": {"d_model": 64},
                "moe": {"num_experts": 6, "top_k": 2, "d_ffn": 8, "d_low": 4},
                "parallel": {"expert_parallel_size": 4},
            },
            r"^moe\.num_experts: num_experts=6 is not divisible",
        ),
        ({"model": {"ffn": "moe"}}, r"^moe: model\.ffn is 'moe'"),
    ],
)
def test_invalid_config_files_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["top_k=3"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("tiny", ["moe.topk=3"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("no_such_preset")
