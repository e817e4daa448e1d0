"""The presets: the paper's parameter counts (732M / 247M, 4B / 1.18B), what each Table 2 / Table 3 configuration
varies, and the Section 4.1 recipe in every paper config's train section."""

from __future__ import annotations

import pytest

from aoe_ep.config import CONFIGS_DIR, count_parameters, load_config
from aoe_ep.train.batches import plan_batches

TABLE2 = {  # config: (file, scorer, d_low or None, aux coefficient, extra MoE fields)
    1: ("01_moe", "router", None, 0.0, {}),
    2: ("02_moe_aux", "router", None, 0.01, {}),
    3: ("03_moe_aux_factorized", "router", 256, 0.01, {"expert_kind": "factorized"}),
    4: ("04_moe_aux_large_router", "router", None, 0.01, {"router_hidden": 2048}),
    5: ("05_aoe_dlow64", "aoe", 64, 0.0, {}),
    6: ("06_aoe_dlow64_aux", "aoe", 64, 0.01, {}),
    7: ("07_aoe_dlow128", "aoe", 128, 0.0, {}),
    8: ("08_aoe_dlow128_aux", "aoe", 128, 0.01, {}),
    9: ("09_aoe_dlow256", "aoe", 256, 0.0, {}),
    10: ("10_aoe_dlow256_aux", "aoe", 256, 0.01, {}),
    11: ("11_aoe_dlow512", "aoe", 512, 0.0, {}),
    12: ("12_aoe_dlow512_aux", "aoe", 512, 0.01, {}),
}
TABLE3 = {  # file: (scorer, selection, aux coefficient)
    "moe_top_p": ("router", "top_p", 0.01),
    "aoe_top_p": ("aoe", "top_p", 0.01),
    "moe_expert_choice": ("router", "expert_choice", 0.0),
    "aoe_expert_choice": ("aoe", "expert_choice", 0.0),
}
SIZE_732M = (
    [f"paper/table2/{TABLE2[i][0]}" for i in TABLE2 if i != 4]
    + [f"paper/table3/{n}" for n in TABLE3]
    + ["paper/moe_732m", "paper/aoe_732m", "self_routing_732m"]
)
SIZE_4B = ["paper/moe_4b", "paper/aoe_4b"]
PAPER = SIZE_732M + SIZE_4B + ["paper/table2/04_moe_aux_large_router"]


# The ERC paper's 3B shape (arXiv 2512.23447: 12 layers, d 1536, 64 experts of width 768, top-8; AoE r = 512 for
# equal parameters): "3B" nominal; the counts `aoe-ep params` prints (paper convention), ERC adds no parameters.
SIZE_3B = {
    "paper/erc_3b_moe": (2881.5e6, 552.5e6),
    "paper/erc_3b_moe_erc": (2881.5e6, 552.5e6),
    "paper/erc_3b_aoe": (2880.3e6, 551.3e6),
}


@pytest.mark.parametrize("preset", sorted(SIZE_3B))
def test_erc_3b_presets_have_the_papers_shape_and_counts(preset):
    cfg = load_config(preset)
    m, moe = cfg.model, cfg.moe
    assert (m.n_layers, m.d_model, m.vocab_size, moe.num_experts, moe.top_k, moe.expert_width) == (
        12,
        1536,
        32000,
        64,
        8,
        768,
    )
    assert moe.erc_loss_coeff == (1.0 if preset.endswith("_erc") else 0.0)
    if moe.scorer == "aoe":
        assert (moe.d_low, moe.d_wide) == (512, 768)  # Eq. 5 keeps the MoE's width at r = 512
    count = count_parameters(cfg)
    total, active = SIZE_3B[preset]
    assert count.total == pytest.approx(total, abs=0.05e6) and count.active == pytest.approx(active, abs=0.05e6)
    assert count.total == pytest.approx(3e9, rel=0.05)


@pytest.mark.parametrize("preset", SIZE_732M + SIZE_4B)
def test_parameter_counts_match_the_paper(preset):
    count = count_parameters(load_config(preset))
    total, active = (732e6, 247e6) if preset in SIZE_732M else (4e9, 1.18e9)
    assert count.total == pytest.approx(total, rel=0.01)
    if "top_p" not in preset:  # top-P activates an input-dependent number of experts
        assert count.active == pytest.approx(active, rel=0.01)


def test_large_router_adds_n_dlow_d_selection_parameters_on_purpose():
    """Table 2 config 4 (Question 5): the router d -> 2048 -> 8 replaces the 8 x 768 one in each of 12 layers."""
    d, n, hidden = 768, 8, 2048
    assert hidden * d == n * 256 * d  # as many selection parameters as AoE's Wdown with d_low = 256
    base = count_parameters(load_config("paper/table2/02_moe_aux"))
    large = count_parameters(load_config("paper/table2/04_moe_aux_large_router"))
    extra = 12 * (d * hidden + hidden * n - n * d)
    assert (large.total - base.total, large.active - base.active) == (extra, extra)


@pytest.mark.parametrize("number", sorted(TABLE2))
def test_table2_configs_vary_what_the_table_says(number):
    name, scorer, d_low, aux, extra = TABLE2[number]
    cfg = load_config(f"paper/table2/{name}")
    moe = cfg.moe
    assert (moe.scorer, moe.num_experts, moe.top_k, moe.d_ffn, moe.selection) == (scorer, 8, 2, 3072, "top_k")
    assert moe.aux_loss_coeff == aux
    if d_low is not None:
        assert moe.d_low == d_low
        assert moe.d_wide == -(-(3 * 768 * 3072 - d_low * 768) // (d_low + 2 * 768))  # Eq. 5, rounded up
    for field, value in extra.items():
        assert getattr(moe, field) == value


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_table3_configs(name):
    scorer, selection, aux = TABLE3[name]
    moe = load_config(f"paper/table3/{name}").moe
    assert (moe.scorer, moe.selection, moe.aux_loss_coeff) == (scorer, selection, aux)
    assert moe.top_p == 0.6 and moe.capacity_factor == 2.0
    if scorer == "aoe":
        assert moe.d_low == 256


@pytest.mark.parametrize("preset", PAPER)
def test_paper_configs_train_with_the_section_4_1_recipe(preset):
    cfg = load_config(preset)
    t = cfg.train
    assert t.lr == (3.2e-4 if preset in SIZE_4B else 2e-4)
    assert (t.min_lr, t.warmup_steps, t.weight_decay, t.beta1, t.beta2, t.grad_clip) == (
        1.28e-5,
        4800,
        0.1,
        0.9,
        0.95,
        1.0,
    )
    assert t.lr_decay_style == "cosine"
    assert t.global_batch_tokens == 4194304 and cfg.data.seq_len == 2048  # 4.2M tokens
    assert t.max_steps * t.global_batch_tokens == pytest.approx(100e9, rel=1e-4)  # 100B tokens
    for world in (8, 64, 512):
        plan_batches(cfg, world, 0)  # the global batch splits over the usual GPU counts


def test_every_preset_loads_and_tiny_fits_the_byte_tokenizer():
    presets = [p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS_DIR.rglob("*.yaml")]
    presets = [p for p in presets if not p.startswith("bench/")]
    assert set(PAPER + ["tiny"]) <= set(presets)
    for preset in presets:
        load_config(preset)
    tiny = load_config("tiny")
    assert tiny.model.vocab_size >= 257 and tiny.moe.scorer == "aoe"
