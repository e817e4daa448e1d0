"""Typed configuration: one dataclass per concern, loaded from YAML with `section.field=value` overrides.

Every impossible setting becomes one `ConfigError` that names the field. Numbers such as d_wide = 3840 are derived
here (Eq. 5) or written in `configs/*.yaml`, nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

# The presets and bench case files, as package data: aoe_ep/configs is a link to the top-level configs/ in a source
# checkout (and so in an editable install) and a folder of copies in a wheel; the same lookup serves all three.
CONFIGS_DIR = Path(str(resources.files("aoe_ep") / "configs"))

SCORERS = ("aoe", "router", "self_routing")
NORMS = ("l2", "l1", "linf")
SELECTIONS = ("top_k", "top_p", "expert_choice", "threshold")
GATES = ("softmax_topk", "softmax_all")
DISPATCHERS = ("allgather", "alltoall")
EXPERT_PLACEMENTS = ("contiguous", "balanced")  # aoe_ep/moe/placement.py
EXPERT_KINDS = ("auto", "swiglu", "factorized")
EXPERT_KERNELS = ("auto", "grouped", "loop")
AOE_CACHES = ("keep", "recompute")
BALANCES = ("aux", "bias", "none")
FFNS = ("dense", "moe")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DENSE_PARALLEL = ("ddp", "fsdp")
AC_MODES = ("none", "selective", "full")  # aoe_ep/train/activation_checkpoint.py


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the field's dotted name."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _one_of(value: Any, choices: tuple, name: str) -> None:
    _require(value in choices, name, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def derive_d_wide(d_model: int, d_ffn: int, d_low: int) -> int:
    """Eq. 5: the AoE width that keeps the expert's parameter count equal to a SwiGLU expert of width d_ffn.

    d_wide = (3·d·d_ffn − d_low·d) / (d_low + 2·d), rounded up (the paper's 6469.2 becomes 6470).
    """
    exact = (3 * d_model * d_ffn - d_low * d_model) / (d_low + 2 * d_model)
    return math.ceil(exact - 1e-9)


@dataclass
class MoEConfig:
    """One MoE / AoE / Self-Routing FFN layer (docs/design.md section 5)."""

    d_model: int = 0
    num_experts: int = 8
    top_k: int = 2
    scorer: str = "aoe"
    d_ffn: int = 3072
    d_low: int = 256
    d_wide: Optional[int] = None
    norm: str = "l2"
    selection: str = "top_k"
    gate: str = "softmax_topk"
    top_p: float = 0.6
    capacity_factor: float = 2.0
    aux_loss_coeff: float = 0.01
    top_p_entropy_coeff: float = 1e-4
    self_routing_offset: int = 0
    dispatcher: str = "allgather"
    expert_kind: str = "auto"
    router_hidden: int = 0
    expert_kernel: str = "auto"
    aoe_cache: str = "keep"
    balance: str = "aux"
    balance_rate: float = 1e-3
    # The expert-router coupling loss (Lv et al., arXiv 2512.23447) for a learned router: weight (0 = off) and α.
    erc_loss_coeff: float = 0.0
    erc_alpha: float = 1.0
    # Threshold selection (Routing-Free MoE, arXiv 2604.00801): expert i fires for a token when
    # G_i = relu(s_i - b_i) > threshold; L_LB = mu·L_EB + (1 - mu)·L_TB, its weight λ (from lambda_init, at most 1)
    # multiplied by (1 + eta)^sign(ρ - density) after every step, ρ the fraction of (token, expert) pairs fired.
    # λ replaces aux_loss_coeff, which threshold selection does not use (aoe_ep/moe/threshold.py).
    threshold: float = 0.0
    threshold_density: float = 0.25
    threshold_mu: float = 0.5
    threshold_eta: float = 0.2
    threshold_lambda_init: float = 1e-5

    def __post_init__(self) -> None:
        if self.factorized and self.d_wide is None and isinstance(self.d_low, int) and self.d_low > 0:
            if isinstance(self.d_model, int) and isinstance(self.d_ffn, int):
                self.d_wide = derive_d_wide(self.d_model, self.d_ffn, self.d_low)
        self.validate("moe")

    def validate(self, prefix: str = "moe") -> None:
        p = prefix + "."
        _require(
            _is_int(self.d_model) and self.d_model > 0,
            p + "d_model",
            f"must be a positive integer, got {self.d_model!r}",
        )
        _require(
            _is_int(self.num_experts) and self.num_experts > 0,
            p + "num_experts",
            f"must be a positive integer, got {self.num_experts!r}",
        )
        _one_of(self.scorer, SCORERS, p + "scorer")
        _one_of(self.norm, NORMS, p + "norm")
        _one_of(self.selection, SELECTIONS, p + "selection")
        _one_of(self.gate, GATES, p + "gate")
        _one_of(self.dispatcher, DISPATCHERS, p + "dispatcher")
        _one_of(self.expert_kind, EXPERT_KINDS, p + "expert_kind")
        _one_of(self.expert_kernel, EXPERT_KERNELS, p + "expert_kernel")
        _one_of(self.aoe_cache, AOE_CACHES, p + "aoe_cache")
        _require(
            not (self.scorer == "aoe" and self.expert_kind == "swiglu"),
            p + "expert_kind",
            "AoE experts are factorised (they reuse the scorer's cache); 'swiglu' needs a router or self_routing",
        )
        _require(
            _is_int(self.router_hidden) and self.router_hidden >= 0,
            p + "router_hidden",
            f"must be a non-negative integer, got {self.router_hidden!r}",
        )
        _require(
            self.router_hidden == 0 or self.scorer == "router",
            p + "router_hidden",
            f"only a learned router has a hidden layer, scorer is {self.scorer!r}",
        )
        _require(_is_int(self.top_k) and self.top_k > 0, p + "top_k", f"must be a positive integer, got {self.top_k!r}")
        _require(
            self.top_k <= self.num_experts, p + "top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}"
        )
        _require(_is_int(self.d_ffn) and self.d_ffn > 0, p + "d_ffn", f"must be a positive integer, got {self.d_ffn!r}")
        if self.factorized:
            _require(
                _is_int(self.d_low) and self.d_low > 0, p + "d_low", f"must be a positive integer, got {self.d_low!r}"
            )
            _require(
                _is_int(self.d_wide) and self.d_wide > 0,
                p + "d_wide",
                f"must be a positive integer, got {self.d_wide!r}",
            )
        _require(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
            p + "top_p",
            f"must lie in (0, 1], got {self.top_p!r}",
        )
        _require(
            _is_number(self.capacity_factor) and self.capacity_factor > 0,
            p + "capacity_factor",
            f"must be a positive finite number, got {self.capacity_factor!r}",
        )
        _require(
            _is_number(self.aux_loss_coeff) and self.aux_loss_coeff >= 0,
            p + "aux_loss_coeff",
            f"must be a finite number >= 0, got {self.aux_loss_coeff!r}",
        )
        _require(
            _is_number(self.top_p_entropy_coeff) and self.top_p_entropy_coeff >= 0,
            p + "top_p_entropy_coeff",
            f"must be a finite number >= 0, got {self.top_p_entropy_coeff!r}",
        )
        # `aux`: the load-balancing loss with aux_loss_coeff; `bias`: DeepSeek-V3's aux-loss-free per-expert bias
        # (aoe_ep/moe/balance.py), aux_loss_coeff unused; `none`: neither. Top-P's entropy term applies in all three.
        _one_of(self.balance, BALANCES, p + "balance")
        _require(
            isinstance(self.balance_rate, (int, float))
            and not isinstance(self.balance_rate, bool)
            and 0 < self.balance_rate < math.inf,
            p + "balance_rate",
            f"must be a positive finite number, got {self.balance_rate!r}",
        )
        _require(
            not (self.balance == "bias" and self.selection == "expert_choice"),
            p + "balance",
            "'bias' needs token choice (top_k or top_p): under expert_choice every expert takes exactly its "
            "capacity, so there is no load to balance",
        )
        _require(
            _is_number(self.erc_loss_coeff) and self.erc_loss_coeff >= 0,
            p + "erc_loss_coeff",
            f"must be >= 0, got {self.erc_loss_coeff!r}",
        )
        _require(
            _is_number(self.erc_alpha) and self.erc_alpha > 0,
            p + "erc_alpha",
            f"must be positive, got {self.erc_alpha!r}",
        )
        _require(
            self.erc_loss_coeff == 0 or self.scorer == "router",
            p + "erc_loss_coeff",
            f"the ERC loss couples a learned router to its experts; scorer is {self.scorer!r}",
        )
        _require(
            self.erc_loss_coeff == 0 or self.num_experts > 1,
            p + "erc_loss_coeff",
            "the ERC loss needs at least two experts",
        )
        # The router rows are fed through the experts' gate projections, so they must live in the model dimension.
        _require(
            self.erc_loss_coeff == 0 or not self.router_hidden,
            p + "erc_loss_coeff",
            f"the ERC loss feeds router rows to the experts, so it needs router_hidden = 0 (rows of width "
            f"d_model), got router_hidden={self.router_hidden!r}",
        )
        _require(
            _is_number(self.threshold) and self.threshold >= 0, p + "threshold", f"must be >= 0, got {self.threshold!r}"
        )
        _require(
            _is_number(self.threshold_density) and 0 < self.threshold_density <= 1,
            p + "threshold_density",
            f"must lie in (0, 1], got {self.threshold_density!r}",
        )
        _require(
            _is_number(self.threshold_mu) and 0 <= self.threshold_mu <= 1,
            p + "threshold_mu",
            f"must lie in [0, 1], got {self.threshold_mu!r}",
        )
        _require(
            _is_number(self.threshold_eta) and self.threshold_eta > 0,
            p + "threshold_eta",
            f"must be positive, got {self.threshold_eta!r}",
        )
        _require(
            _is_number(self.threshold_lambda_init) and 0 < self.threshold_lambda_init <= 1,
            p + "threshold_lambda_init",
            f"must lie in (0, 1], got {self.threshold_lambda_init!r}",
        )
        _require(
            not (self.selection == "threshold" and self.balance == "bias"),
            p + "balance",
            "threshold selection balances with its own adaptive loss (balance: aux) or not at all (none)",
        )
        if self.scorer == "self_routing":
            _require(
                _is_int(self.self_routing_offset) and self.self_routing_offset >= 0,
                p + "self_routing_offset",
                f"must be a non-negative integer, got {self.self_routing_offset!r}",
            )
            _require(
                self.self_routing_offset + self.num_experts <= self.d_model,
                p + "num_experts",
                f"self_routing reads channels [{self.self_routing_offset}, "
                f"{self.self_routing_offset + self.num_experts}) but d_model={self.d_model}",
            )

    @property
    def factorized(self) -> bool:
        """Experts with W_g = Wdown·Wup (Eq. 4): always for AoE; for the others with `expert_kind: factorized`
        (the paper's Table 2 config 3)."""
        return self.scorer == "aoe" or self.expert_kind == "factorized"

    @property
    def unselected_get_gradient(self) -> bool:
        """Whether an expert a token did not select gets a gradient through its score: through the full softmax
        of the aux loss, the `softmax_all` gate or the top-P entropy term. When none applies, AoE keeps only the
        selected cache rows for backward (docs/design.md section 3). Under threshold selection an unfired expert's
        G = relu(s - b) is at most the threshold: with threshold 0 it is 0 with relu's gradient 0; with a positive
        threshold it may be positive and gets a gradient through the balancing loss's mean G."""
        if self.selection == "threshold":
            return self.threshold > 0 and self.balance == "aux"
        if self.gate == "softmax_all":
            return True
        if self.selection == "expert_choice":
            return False
        return self.load_balancing_coeff > 0 or (self.selection == "top_p" and self.top_p_entropy_coeff > 0)

    @property
    def experts_per_token(self) -> float:
        """Experts a token uses on average, for the cost models: K (top-P is reported at K), capacity_factor under
        expert choice, density·n under threshold selection (at its target density)."""
        if self.selection == "expert_choice":
            return self.capacity_factor
        if self.selection == "threshold":
            return self.threshold_density * self.num_experts
        return self.top_k

    @property
    def load_balancing_coeff(self) -> float:
        """The weight of the load-balancing loss: aux_loss_coeff under `balance: aux`, 0 under `bias` and `none`."""
        return self.aux_loss_coeff if self.balance == "aux" else 0.0

    @property
    def expert_width(self) -> int:
        """Hidden width of one expert: d_wide for factorised experts, d_ffn otherwise."""
        return self.d_wide if self.factorized else self.d_ffn


@dataclass
class ModelConfig:
    """Llama-style decoder; `ffn` picks a dense SwiGLU (width `d_ffn`) or the MoE layer of `Config.moe`."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    vocab_size: int = 256
    max_seq_len: int = 256
    ffn: str = "moe"
    d_ffn: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def validate(self, prefix: str = "model") -> None:
        p = prefix + "."
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len", "d_ffn"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, p + name, f"must be a positive integer, got {value!r}")
        _one_of(self.ffn, FFNS, p + "ffn")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, p + name, f"must be a positive finite number, got {value!r}")
        _require(
            self.d_model % self.n_heads == 0,
            p + "n_heads",
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )


@dataclass
class ParallelConfig:
    """World = data_parallel x expert_parallel (EP inner). expert_placement: which experts each EP rank holds,
    "contiguous" (rank r: [r·n/EP, (r+1)·n/EP)) or "balanced" (chosen from the load the last checkpoint recorded,
    when a checkpoint is saved or loaded; `aoe_ep.moe.placement`); placement_half_life: steps over which a step's
    counts lose half their weight in that load (0: every step since the last checkpoint weighs the same)."""

    expert_parallel_size: int = 1
    expert_placement: str = "contiguous"
    placement_half_life: float = 10.0

    def validate(self, prefix: str = "parallel") -> None:
        _require(
            _is_int(self.expert_parallel_size) and self.expert_parallel_size > 0,
            prefix + ".expert_parallel_size",
            f"must be a positive integer, got {self.expert_parallel_size!r}",
        )
        _one_of(self.expert_placement, EXPERT_PLACEMENTS, prefix + ".expert_placement")
        _require(
            isinstance(self.placement_half_life, (int, float))
            and not isinstance(self.placement_half_life, bool)
            and 0 <= self.placement_half_life < float("inf"),
            prefix + ".placement_half_life",
            f"must be a non-negative number of steps, got {self.placement_half_life!r}",
        )


@dataclass
class DataConfig:
    """Training data: megatron-core indexed datasets (`paths` are .bin/.idx prefixes, blended by `weights`), or the
    built-in default corpus when `paths` is empty (this Python's standard library sources, the first
    `default_corpus_max_bytes` of them). `tokenizer`: "byte", a tokenizers .json file or a sentencepiece .model."""

    paths: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer: str = "byte"
    seq_len: int = 128
    cache_dir: str = ".cache/aoe_ep"
    default_corpus_max_bytes: int = 16_000_000

    def validate(self, prefix: str = "data") -> None:
        p = prefix + "."
        _require(
            _is_int(self.seq_len) and self.seq_len > 0,
            p + "seq_len",
            f"must be a positive integer, got {self.seq_len!r}",
        )
        _require(
            isinstance(self.tokenizer, str) and self.tokenizer.strip() != "",
            p + "tokenizer",
            f"must be 'byte' or a tokenizer file path, got {self.tokenizer!r}",
        )
        _require(
            isinstance(self.cache_dir, str) and self.cache_dir.strip() != "",
            p + "cache_dir",
            f"must be a directory path, got {self.cache_dir!r}",
        )
        _require(
            _is_int(self.default_corpus_max_bytes) and self.default_corpus_max_bytes > 0,
            p + "default_corpus_max_bytes",
            f"must be a positive integer, got {self.default_corpus_max_bytes!r}",
        )
        _require(
            isinstance(self.paths, list) and all(isinstance(x, str) for x in self.paths),
            p + "paths",
            "must be a list of dataset prefixes",
        )
        _require(
            not self.weights or len(self.weights) == len(self.paths),
            p + "weights",
            f"{len(self.weights)} weights for {len(self.paths)} paths",
        )
        _require(
            all(_is_number(w) and w >= 0 for w in self.weights), p + "weights", "must be non-negative finite numbers"
        )
        parts = str(self.split).split(",")
        _require(
            len(parts) == 3 and all(x.strip().replace(".", "", 1).isdigit() for x in parts),
            p + "split",
            f"must read 'train,valid,test' weights such as '98,2,0', got {self.split!r}",
        )
        _require(float(parts[0]) > 0, p + "split", f"gives the train part no weight: {self.split!r}")


@dataclass
class TrainConfig:
    """The paper's recipe: AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0, linear warm-up then cosine decay.

    global_batch_tokens per optimiser step (split into micro-batches of micro_batch_size sequences per rank);
    eval_steps global batches of validation data every eval_interval steps; lr_decay_style over lr_decay_steps
    (None: max_steps); exit_at_step stops (with a checkpoint) before max_steps without changing the schedule;
    keep_checkpoints (0: all); precision "auto" = bf16 autocast on GPU, fp32 on CPU; dense_parallel "ddp" or "fsdp"
    (FSDP2) for the non-expert weights; device "auto" | "cpu" | "cuda"; peak_tflops per GPU for MFU (0: by name);
    max_bad_steps: consecutive steps with a non-finite loss or gradient norm (each skipped on every rank) that stop
    the run. activation_checkpointing "none" | "selective" | "full" on every `ac_every`-th decoder block
    (aoe_ep/train/activation_checkpoint.py); compile: torch.compile each block's norms and attention as one graph,
    dense FFNs and, on one device, the MoE layers' gating (aoe_ep/train/compile.py).
    """

    max_steps: int = 200
    global_batch_tokens: int = 4096
    micro_batch_size: int = 8
    lr: float = 2e-4
    min_lr: float = 1.28e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_steps: int = 4
    save_interval: int = 100
    log_interval: int = 10
    out_dir: str = "runs/default"
    seed: int = 1234
    lr_decay_style: str = "cosine"
    lr_decay_steps: Optional[int] = None
    eval_at_start: bool = True
    exit_at_step: int = 0
    keep_checkpoints: int = 0
    precision: str = "auto"
    dense_parallel: str = "ddp"
    device: str = "auto"
    peak_tflops: float = 0.0
    max_bad_steps: int = 3
    activation_checkpointing: str = "none"
    ac_every: int = 1
    compile: bool = False

    def validate(self, prefix: str = "train") -> None:
        p = prefix + "."
        for name in (
            "max_steps",
            "global_batch_tokens",
            "micro_batch_size",
            "eval_interval",
            "eval_steps",
            "save_interval",
            "log_interval",
            "max_bad_steps",
        ):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, p + name, f"must be a positive integer, got {value!r}")
        _require(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            p + "warmup_steps",
            f"must be a non-negative integer, got {self.warmup_steps!r}",
        )
        _require(
            _is_int(self.seed) and self.seed >= 0, p + "seed", f"must be a non-negative integer, got {self.seed!r}"
        )
        _require(
            isinstance(self.out_dir, str) and self.out_dir.strip() != "",
            p + "out_dir",
            f"must be a directory path, got {self.out_dir!r}",
        )
        # every float below needs a finite value: an infinite lr or clipping bound trains to NaN weights
        _require(_is_number(self.lr) and self.lr > 0, p + "lr", f"must be a positive finite number, got {self.lr!r}")
        _require(
            _is_number(self.min_lr) and 0 <= self.min_lr <= self.lr,
            p + "min_lr",
            f"must lie in [0, lr={self.lr}], got {self.min_lr!r}",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            p + "weight_decay",
            f"must be a finite number >= 0, got {self.weight_decay!r}",
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < 1, p + name, f"must lie in [0, 1), got {value!r}")
        _require(
            _is_number(self.grad_clip) and self.grad_clip > 0,
            p + "grad_clip",
            f"must be a positive finite number, got {self.grad_clip!r}",
        )
        # lr_decay_steps (None: max_steps) and the step to stop at early (0: max_steps); the schedule is unchanged.
        _one_of(self.lr_decay_style, LR_DECAY_STYLES, p + "lr_decay_style")
        if self.lr_decay_steps is None:
            _require(
                self.max_steps > self.warmup_steps,
                p + "warmup_steps",
                f"{self.warmup_steps} warm-up steps leave no decay before max_steps={self.max_steps}",
            )
        else:
            _require(
                _is_int(self.lr_decay_steps) and self.lr_decay_steps > self.warmup_steps,
                p + "lr_decay_steps",
                f"must be an integer above warmup_steps={self.warmup_steps}, got {self.lr_decay_steps!r}",
            )
        for name in ("exit_at_step", "keep_checkpoints"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, p + name, f"must be a non-negative integer, got {value!r}")
        _one_of(self.precision, PRECISIONS, p + "precision")
        _one_of(self.dense_parallel, DENSE_PARALLEL, p + "dense_parallel")
        _one_of(self.device, ("auto", "cpu", "cuda"), p + "device")
        _require(
            _is_number(self.peak_tflops) and self.peak_tflops >= 0,
            p + "peak_tflops",
            f"must be a finite number >= 0 (0: look the GPU up), got {self.peak_tflops!r}",
        )
        _one_of(self.activation_checkpointing, AC_MODES, p + "activation_checkpointing")
        _require(
            _is_int(self.ac_every) and self.ac_every > 0,
            p + "ac_every",
            f"must be a positive integer (checkpoint every N-th block), got {self.ac_every!r}",
        )
        _require(isinstance(self.compile, bool), p + "compile", f"must be true or false, got {self.compile!r}")
        # selective recomputes through an op-level policy (a dense FFN) and saved-tensor hooks (attention), which
        # a compiled graph's fused kernels do not run
        _require(
            not (self.compile and self.activation_checkpointing == "selective"),
            p + "compile",
            "does not combine with train.activation_checkpointing=selective; use 'full' or 'none'",
        )


@dataclass
class Config:
    """The whole experiment. `moe.d_model` follows `model.d_model` when the YAML leaves it out."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: Optional[MoEConfig] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        self.model.validate("model")
        self.parallel.validate("parallel")
        self.data.validate("data")
        self.train.validate("train")
        if self.model.ffn == "moe":
            _require(self.moe is not None, "moe", "model.ffn is 'moe' but no moe section is given")
        if self.moe is not None:
            _require(
                self.moe.d_model == self.model.d_model,
                "moe.d_model",
                f"{self.moe.d_model} differs from model.d_model={self.model.d_model}",
            )
            ep = self.parallel.expert_parallel_size
            _require(
                self.moe.num_experts % ep == 0,
                "moe.num_experts",
                f"num_experts={self.moe.num_experts} is not divisible by parallel.expert_parallel_size={ep}",
            )
        return self


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------------------
# YAML loading and overrides


def _build(cls: type, raw: Any, prefix: str, extra: Optional[dict] = None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = dict(extra or {})
    for key, value in raw.items():
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        message = str(err)
        if not message.startswith(prefix + "."):
            message = f"{prefix}.{message.split('.', 1)[-1]}"
        raise ConfigError(message) from None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """YAML gives ints for floats (`top_p: 1`) and strings for everything on the command line; accept both."""
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    target = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
    if value is None and not optional and target is not Any:
        raise ConfigError(f"{name}: needs a value (an empty value, or YAML null, was given)")
    if value is None or target is Any:
        return value
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if target in (int, float, str, bool) and not isinstance(value, target):
        raise ConfigError(f"{name}: expected {target.__name__}, got {value!r}")
    return value


def config_from_dict(raw: dict) -> Config:
    """Build and validate a `Config` from a nested mapping (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(known))})")
    model = _build(ModelConfig, raw.get("model", {}), "model")
    model.validate("model")  # before the moe section, whose d_model follows model.d_model
    parallel = _build(ParallelConfig, raw.get("parallel", {}), "parallel")
    moe = None
    if raw.get("moe") is not None:
        moe_raw = dict(raw["moe"]) if isinstance(raw["moe"], dict) else raw["moe"]
        if isinstance(moe_raw, dict):
            moe_raw.setdefault("d_model", model.d_model)
        moe = _build(MoEConfig, moe_raw, "moe")
    data = _build(DataConfig, raw.get("data", {}), "data")
    train = _build(TrainConfig, raw.get("train", {}), "train")
    return Config(model=model, moe=moe, parallel=parallel, data=data, train=train).validate()


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.field=value` strings (values parsed as YAML) to a nested mapping, returning a new one."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"{item}: an override must read section.field=value, e.g. moe.top_k=4")
        section, name = parts
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{key.strip()}: the value {text!r} is not valid YAML ({str(err).splitlines()[0]})"
            ) from None
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            out[section] = {}
        out[section][name] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe YAML that refuses a key given twice in one mapping (plain YAML lets the last one win silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a preset in configs/ (`tiny` -> configs/tiny.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config: {name_or_path} is a directory; name a YAML file or a preset")
    if path.exists():
        raise ConfigError(f"config: {name_or_path} is not a regular file; name a YAML file or a preset")
    for candidate in (CONFIGS_DIR / name_or_path, CONFIGS_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    if not CONFIGS_DIR.is_dir():
        raise ConfigError(
            f"config: no file named {name_or_path!r}, and the presets folder {CONFIGS_DIR} is missing "
            f"from this aoe-ep install"
        )
    presets = sorted(p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS_DIR.rglob("*.yaml"))
    raise ConfigError(f"config: no file or preset named {name_or_path!r} (presets: {', '.join(presets)})")


def load_config(name_or_path: str, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file or preset, apply overrides, validate."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as err:
        raise ConfigError(f"config: cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if raw is None:
        raise ConfigError(f"config: {path} is empty (it needs at least a model section)")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config: {path} must hold a mapping of sections (model, moe, ...) at the top level, "
            f"not a {type(raw).__name__}"
        )
    return config_from_dict(apply_overrides(raw, overrides or []))


# ----------------------------------------------------------------------------------------------------------------
# Parameter count


@dataclass(frozen=True)
class ParamCount:
    """Total and active parameters.

    Convention (the paper's): `total` counts the vocabulary matrix once, `active` counts it twice (embedding and
    output head), so the 12-layer d=768 configuration reads 732.4M / 247.4M and the 4B one 3.97B / 1.18B. An AoE
    expert's active parameters are its whole factorised expert (Wdown_i included) for each of the K it selects, as in
    the paper; `active_compute` also counts the Wdown of the unselected experts, which every token multiplies.
    `total_untied` is the exact count of the model as built (untied embedding and head, norms included).
    """

    total: int
    active: int
    active_compute: int
    total_untied: int


def ffn_param_count(model: ModelConfig, moe: Optional[MoEConfig]) -> tuple[int, int, int]:
    """(all, active, active_compute) parameters of one FFN layer; see `ParamCount`."""
    d = model.d_model
    if model.ffn == "dense" or moe is None:
        n = 3 * d * model.d_ffn
        return n, n, n
    per_expert = d * moe.d_low + (d + moe.d_low + d) * moe.d_wide if moe.factorized else 3 * d * moe.d_ffn
    selector_per_expert = d * moe.d_low if moe.scorer == "aoe" else 0
    if moe.scorer == "router":
        shared = (
            (d * moe.router_hidden + moe.router_hidden * moe.num_experts) if moe.router_hidden else moe.num_experts * d
        )
    else:
        shared = 0
    if moe.selection == "threshold":
        shared += moe.num_experts  # the learned per-expert threshold bias b
    active_experts = moe.experts_per_token
    total = shared + moe.num_experts * per_expert
    active = shared + active_experts * per_expert
    compute = active + (moe.num_experts - active_experts) * selector_per_expert
    return total, int(active), int(compute)


def count_parameters(cfg: Config) -> ParamCount:
    """Parameter counts of the decoder described by `cfg` (see `ParamCount` for the conventions)."""
    m = cfg.model
    per_layer = 4 * m.d_model * m.d_model + 2 * m.d_model  # attention projections and the two RMSNorms
    ffn_all, ffn_active, ffn_compute = ffn_param_count(m, cfg.moe)
    vocab = m.vocab_size * m.d_model
    return ParamCount(
        total=m.n_layers * (per_layer + ffn_all) + vocab,
        active=m.n_layers * (per_layer + ffn_active) + 2 * vocab,
        active_compute=m.n_layers * (per_layer + ffn_compute) + 2 * vocab,
        total_untied=m.n_layers * (per_layer + ffn_all) + 2 * vocab + m.d_model,
    )
