"""The training loop, top to bottom: setup, then per step micro-batches → backward → expert-gradient reduction →
clipping → scheduler → AdamW, with validation, logging and checkpoints at their intervals.

    with Trainer(load_config("tiny")) as trainer:
        result = trainer.fit()

A step minimises the mean over micro-batches and ranks of (token-mean cross-entropy + Σ_layers aux loss); the
logged `loss` is the cross-entropy part (validation perplexity is its exp), `aux_loss` the rest. Under expert
parallelism each rank's aux loss is its EP group's value whose gradient flows through the rank's own tokens only
(summed over the group it is the single-device gradient); the step's `StepContext` asks the layers for it in the
form that survives the world-wide mean DDP takes (its gradient scaled by the EP size, its value unchanged), which
keeps its weight equal to the single-device recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from aoe_ep.config import Config, ConfigError, ModelConfig, MoEConfig
from aoe_ep.model import Decoder, init_parameters, token_cross_entropy
from aoe_ep.moe import MoELayer, StepContext
from aoe_ep.moe.balance import step_token_counts
from aoe_ep.moe.balancing import needs_step_counts, update_balancing
from aoe_ep.moe.threshold import step_tokens
from aoe_ep.parallel.runtime import all_reduce_, setup_runtime, teardown
from aoe_ep.train import checkpoint as ckpt
from aoe_ep.train import placement as place
from aoe_ep.train.activation_checkpoint import apply_activation_checkpointing
from aoe_ep.train.balancing_log import balancing_scalars
from aoe_ep.train.batches import BatchPlan, collate, plan_batches
from aoe_ep.train.compile import compile_blocks
from aoe_ep.train.consistency import check_ranks_agree, check_replicas_agree
from aoe_ep.train.diagnostics import ChurnProbe, diagnostic_scalars, probe_tokens
from aoe_ep.train.flops import peak_flops, train_flops_per_token
from aoe_ep.train.guards import BadStepCounter, StepHealth, TrainingError, verdict
from aoe_ep.train.memory_fit import check_state_fits
from aoe_ep.train.metrics import (
    MoEStatsAccumulator,
    RunLogger,
    comm_scalars,
    load_heatmap,
    moe_scalars,
    peak_memory_bytes,
    progress_bar,
)
from aoe_ep.train.optim import build_optimizer, build_scheduler
from aoe_ep.train.parallelize import DataParallelModel
from aoe_ep.train.run_lock import RunLock, prepare_out_dir
from aoe_ep.train.validation import autocast, autocast_dtype, num_validation_batches, validation_sums

# The data pipeline's two entry points (aoe_ep.data's signatures); tests hand in small in-memory versions.
DataBuilders = tuple[Callable, Callable]


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    skipped: bool = False  # a non-finite loss or gradient norm: no update was applied


@dataclass
class TrainResult:
    """step: the step reached; history: one record per step run here; evals: (step, validation loss) pairs;
    checkpoint: the last checkpoint written (or found at that step); seconds: wall time of `fit`; is_main: rank 0."""

    step: int
    is_main: bool = True
    history: list[StepRecord] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    seconds: float = 0.0


def default_data_builders() -> DataBuilders:
    from aoe_ep.data import build_datasets, build_tokenizer

    return build_tokenizer, build_datasets


class Trainer:
    """Builds everything in `__init__` (process groups, data, model, optimizer, schedule, resume); `fit` trains.

    resume: None (a fresh run; an out_dir that already holds checkpoints is refused), "latest" (the newest
    checkpoint under train.out_dir), "auto" ("latest" when there is one, else a fresh run) or a checkpoint path.
    """

    def __init__(self, cfg: Config, resume: Optional[str] = None, data: Optional[DataBuilders] = None):
        self.cfg = cfg
        self.lock: Optional[RunLock] = None
        self.runtime = setup_runtime(cfg.train, cfg.parallel.expert_parallel_size)
        try:
            self._setup(resume, data or default_data_builders())
        except BaseException:
            self._release_lock()
            teardown(self.runtime)
            raise

    # ------------------------------------------------------------------------------------------------------------
    # setup

    def _setup(self, resume: Optional[str], data: DataBuilders) -> None:
        cfg, rt = self.cfg, self.runtime
        check_ranks_agree(cfg, rt.device, resume)  # first of all: a rank with another config stops every rank
        self.out_dir = Path(cfg.train.out_dir)
        self.plan: BatchPlan = plan_batches(cfg, rt.world_size, rt.rank)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        check_state_fits(cfg, rt.ep_size, rt.world_size, rt.device, local_ranks)  # before anything is allocated
        self._lock_out_dir()
        build_tokenizer, build_datasets = data
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the vocabulary of the "
                f"tokenizer {cfg.data.tokenizer!r} ({tokenizer.vocab_size} ids); set model.vocab_size "
                f">= {tokenizer.vocab_size}"
            )

        self.ckpt_root = ckpt.checkpoint_root(self.out_dir)
        resume_path = self._resolve_resume(resume)
        start_step = int(ckpt.read_meta(resume_path)["step"]) if resume_path is not None else 0
        if resume_path is not None and start_step > cfg.train.max_steps:
            raise ConfigError(
                f"train.max_steps: the checkpoint {resume_path} is at step {start_step}, past "
                f"max_steps={cfg.train.max_steps}: nothing to train; raise train.max_steps"
            )
        self.config_changes = self._config_changes(resume_path) if resume_path is not None else []
        self.superseded = self._branch_history(start_step) if resume_path is not None else None
        self._record_start(start_step)

        # Data before the model, so that a data problem is reported before minutes of model building.
        meta = ckpt.read_meta(resume_path) if resume_path is not None else {"step": 0, "consumed_samples": 0}
        remaining = max(0, cfg.train.max_steps - int(meta["step"]))
        self.train_ds, self.valid_ds = build_datasets(
            cfg.data,
            tokenizer,
            train_samples=int(meta["consumed_samples"]) + remaining * self.plan.global_samples,
            valid_samples=cfg.train.eval_steps * self.plan.global_samples,
            seed=cfg.train.seed,
        )
        self.eval_batches = num_validation_batches(self.valid_ds, self.plan, cfg.train.eval_steps)

        torch.manual_seed(cfg.train.seed)
        with torch.device(rt.device):  # built in place: a GPU rank never holds the model in host memory
            model = Decoder(cfg.model, cfg.moe, ep_group=rt.groups.ep_group)
        init_parameters(model, cfg.train.seed)  # one model for every layout (aoe_ep/model/init.py)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.bias_balancing = any(layer.cfg.balance == "bias" for layer in self.moe_layers)
        self.threshold_balancing = any(
            layer.cfg.selection == "threshold" and layer.cfg.balance == "aux" for layer in self.moe_layers
        )
        apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
        if cfg.train.compile:
            compile_blocks(model, rt.device)
        self.dp = DataParallelModel(model, rt, cfg.train.dense_parallel)
        self.optimizer = build_optimizer(model, cfg.train, rt.device, allow_apex=self.dp.kind != "fsdp")
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.step, self.consumed_samples = 0, 0
        self.bad_steps = BadStepCounter(cfg.train.max_bad_steps, skipped=int(meta.get("skipped_steps", 0)))

        self.resumed_from = resume_path
        self.expert_load = place.ExpertLoad(
            len(self.moe_layers), cfg.moe.num_experts if cfg.moe else 0, cfg.parallel.placement_half_life, rt.device
        )
        self.load_since = int(meta["step"])
        self.placement_note: list[str] = []
        if resume_path is not None:
            self._place_from(meta)
            progress = ckpt.load_checkpoint(resume_path, model, self.optimizer, self.scheduler, rt)
            self.step, self.consumed_samples = int(progress["step"]), int(progress["consumed_samples"])

        self.autocast_dtype = autocast_dtype(cfg.train.precision, rt.device)
        if self.autocast_dtype is not None and rt.device.type == "cpu":
            # bf16 on a CPU without native bf16 kernels meets denormal fp32 values early in training, which x86 runs
            # tens of times slower (measured: 0.2 s steps of the tiny model took 1.7-3.8 s); flush them to zero.
            rt.flush_denormals()  # until teardown
        self.flops_per_token = train_flops_per_token(cfg, self.plan.seq_len)
        self.peak_flops = peak_flops(rt.device, cfg.train.peak_tflops)
        self.moe_stats = MoEStatsAccumulator()
        probe_set = self.valid_ds if self.eval_batches else self.train_ds
        self.probe = (
            ChurnProbe(probe_tokens(probe_set, self.plan, rt.device))
            if self.moe_layers and len(probe_set) >= self.plan.global_samples
            else None
        )
        run_info = {
            "world_size": rt.world_size,
            "expert_parallel_size": rt.ep_size,
            "micro_batch_size": self.plan.micro_batch_size,
            "num_micro_batches": self.plan.num_micro_batches,
            "seq_len": self.plan.seq_len,
            "precision": str(self.autocast_dtype or torch.float32),
        }
        # `config.yaml` stays the record of the run's first start; every start has its own file under starts/
        first_start = not (self.out_dir / "config.yaml").exists()
        self.logger = RunLogger(
            self.out_dir,
            rt.is_main,
            purge_step=self.step if resume_path is not None else None,
            config_yaml=self._config_yaml() if first_start else None,
            run_info=run_info,
        )
        if resume_path is not None and self.step < cfg.train.max_steps:
            self._settle_ddp_buckets()

    def _settle_ddp_buckets(self) -> None:
        """DDP re-orders its gradient buckets after a process's first backward (to the order in which gradients
        become ready), and the layout decides the order in which an all-reduce over more than two ranks adds up each
        element. A resumed run would reduce its first step in the initial layout where the uninterrupted run used
        the re-ordered one, and drift from it in the last bit; one discarded forward and backward on the next batch
        re-orders them the same way (no update, no logged statistics, no counted bytes)."""
        if self.dp.kind != "ddp" or dist.get_world_size(self.runtime.groups.dp_group) <= 2:
            return  # a sum of two terms is the same in any order
        model, plan = self.dp.module, self.plan
        model.train()
        batch = collate(self.train_ds, plan.indices(self.consumed_samples, 0), self.runtime.device)
        with contextlib.ExitStack() as uncounted:
            for layer in self.moe_layers:
                uncounted.enter_context(layer.dispatcher.counter.paused())
            with self._autocast():
                out = model(batch.tokens, ctx=self._step_context(timed=False))
                ce_sum, count = token_cross_entropy(out.logits, batch.labels, batch.loss_mask)
            (ce_sum / count.clamp_min(1.0) + out.aux_loss).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def _lock_out_dir(self) -> None:
        """Rank 0 creates train.out_dir and takes its run lock; every rank fails together when it cannot."""
        error = None
        if self.runtime.is_main:
            try:
                prepare_out_dir(self.out_dir)
                self.lock = RunLock.acquire(self.out_dir)
            except ConfigError as err:
                error = err
        failed = all_reduce_(
            torch.tensor([int(error is not None)], device=self.runtime.device), op=dist.ReduceOp.MAX
        ).item()
        if error is not None:
            raise error
        if failed:
            raise ConfigError(f"train.out_dir: rank 0 could not create or lock {self.out_dir}")
        if self.lock is not None and self.lock.stale:
            print(
                f"aoe-ep train: note: {self.out_dir} had the stale lock of a run that no longer runs "
                f"({self.lock.stale}); taken over"
            )

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _branch_history(self, step: int) -> Optional[Path]:
        """Resuming from a checkpoint older than the newest one under ckpt_root starts a new branch of history: the
        later checkpoints move aside (kept) and `latest` names the resumed one, so that what this run saves is
        what is on disk and `latest` is its newest checkpoint."""
        aside, error = None, None
        if self.runtime.is_main:
            try:
                aside = ckpt.set_aside_after(self.ckpt_root, step)
            except OSError as err:
                error = f"{err.strerror or err}"
            if aside is not None:
                moved = ", ".join(sorted(p.name for p in aside.iterdir()))
                print(
                    f"aoe-ep train: resuming at step {step} starts a new history: the later checkpoints "
                    f"({moved}) were moved to {aside}"
                )
        failed = all_reduce_(
            torch.tensor([int(error is not None)], device=self.runtime.device), op=dist.ReduceOp.MAX
        ).item()
        if failed:
            raise ckpt.CheckpointError(
                f"{self.ckpt_root}: cannot move the checkpoints after step {step} aside "
                f"({error or 'on rank 0'}); nothing was resumed"
            )
        return aside

    def _config_changes(self, path: Path) -> list[str]:
        """Every field whose value differs from the config the checkpoint was written with (section.field)."""
        try:
            saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return []
        now = dataclasses.asdict(self.cfg)
        changes = []
        for section, values in now.items():
            before = saved.get(section) if isinstance(saved, dict) else None
            if not isinstance(values, dict) or not isinstance(before, dict):
                continue
            changes += [
                f"{section}.{key} {before[key]!r} -> {value!r}"
                for key, value in values.items()
                if key in before and before[key] != value
            ]
        return changes

    def _record_start(self, step: int) -> None:
        """Write this start's config to `<out_dir>/starts/start_NNN_step_SSSSSSSS.yaml` (never overwritten)."""
        if not self.runtime.is_main:
            return
        starts = self.out_dir / "starts"
        try:
            starts.mkdir(exist_ok=True)
            number = 1 + sum(1 for p in starts.glob("start_*.yaml"))
            path = starts / f"start_{number:03d}_{ckpt.step_name(step)}.yaml"
            while path.exists():
                number += 1
                path = starts / f"start_{number:03d}_{ckpt.step_name(step)}.yaml"
            path.write_text(self._config_yaml())
        except OSError as err:  # rank 0 alone: a note, not an error the other ranks would not share
            print(f"aoe-ep train: note: cannot record this start's config under {starts}: {err.strerror or err}")

    def _balanced(self) -> bool:
        return self.cfg.parallel.expert_placement == "balanced" and self.runtime.ep_size > 1 and bool(self.moe_layers)

    def _place_from(self, meta: dict) -> None:
        """Under `balanced`, route by the placement the checkpoint's recorded load asks for; the load then moves each
        expert's parameters and moments from the checkpoint (stored by global identity) to its rank."""
        if not self._balanced():
            return
        counts = place.recorded_load(meta)
        if counts is None or counts.shape != (len(self.moe_layers), self.cfg.moe.num_experts):
            self.placement_note = ["expert placement: the checkpoint records no per-expert load; contiguous"]
            return
        placements = place.choose(counts, self.runtime.ep_size)
        entry = meta.get(place.LOAD_KEY, {})
        self.placement_note = [
            "expert placement: balanced, from the load the checkpoint recorded (steps "
            f"{entry.get('since_step')}-{meta['step']}, half-life {entry.get('half_life_steps')}):",
            *place.describe(self.moe_layers, placements, counts),
        ]
        for layer, placement in zip(self.moe_layers, placements):
            layer.set_placement(placement)

    def _resolve_resume(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint to start from (None: a fresh run), after clearing what an interrupted save left.

        Workers that torchrun restarted after a failure continue their own run ("auto"). Only the agent whose
        worker failed counts a restart (TORCHELASTIC_RESTART_COUNT > 0); the others restart theirs for the new
        rendezvous round with a count of 0, so the ranks take the maximum."""
        count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        restarted = all_reduce_(torch.tensor([count], device=self.runtime.device), op=dist.ReduceOp.MAX).item() > 0
        if resume is None and restarted:
            resume = "auto"
        if self.runtime.is_main:
            for path in ckpt.remove_stale_tmp(self.ckpt_root):
                print(f"removed {path}, left by an interrupted checkpoint save")
        dist.barrier()
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if resume == "auto":
            resume = ckpt.LATEST if latest is not None else None
        if resume is None:
            if latest is not None:
                raise ckpt.CheckpointError(
                    f"{self.ckpt_root} already holds checkpoints: pass --resume to continue "
                    f"that run, or set train.out_dir to a new directory"
                )
            return None
        path = ckpt.resolve_checkpoint(resume, self.out_dir)
        ckpt.verify_checkpoint(path, self.runtime.device)  # every rank refuses a modified checkpoint together
        self._check_compatible(path)
        return path

    def _check_compatible(self, path: Path) -> None:
        """A checkpoint of another model would fail deep inside DCP, or worse, load; name the differing fields.
        How tokens travel (`moe.dispatcher`) and the RoPE table length (`model.max_seq_len`) may change."""
        saved = yaml.safe_load((path / "config.yaml").read_text())
        now = dataclasses.asdict(self.cfg)
        free = {("moe", "dispatcher"), ("model", "max_seq_len")}
        tokenizer = (saved.get("data") or {}).get("tokenizer", "byte")
        if tokenizer != self.cfg.data.tokenizer:
            raise ckpt.CheckpointError(
                f"{path} was trained with data.tokenizer={tokenizer!r}, the config names "
                f"{self.cfg.data.tokenizer!r}: token ids would change meaning"
            )
        # a field added after the checkpoint was written (`moe.balance`) reads there as its default
        defaults = {
            "model": {f.name: f.default for f in dataclasses.fields(ModelConfig)},
            "moe": {f.name: f.default for f in dataclasses.fields(MoEConfig)},
        }

        def stored(section: str, key: str):
            return (saved.get(section) or {}).get(key, defaults[section].get(key))

        diffs = [
            f"{section}.{key}: {stored(section, key)!r} in the checkpoint, {value!r} now"
            for section in ("model", "moe")
            for key, value in (now.get(section) or {}).items()
            if (section, key) not in free and stored(section, key) != value
        ]
        if (saved.get("moe") is None) != (now.get("moe") is None):
            diffs.append("moe: present in only one of the checkpoint and the config")
        if diffs:
            raise ckpt.CheckpointError(f"{path} was written for a different model: {'; '.join(diffs)}")

    def _autocast(self):
        return autocast(self.autocast_dtype, self.runtime.device)

    def _step_context(self, timed: bool) -> StepContext:
        """What the MoE layers run under at the current step: non-finite input flows on and is reported (the step
        guard decides), the ERC noise follows (run seed, layer, step), and the aux loss comes in the form added to
        the loss below (DDP averages the gradients of every rank). `timed`: the layers synchronise the accelerator
        to time their phases."""
        return StepContext(
            step=self.step,
            seed=self.cfg.train.seed,
            synchronize_timing=timed,
            input_check="flag",
            rank_mean_gradients=True,
        )

    # ------------------------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> TrainResult:
        t = self.cfg.train
        stop = min(t.max_steps, t.exit_at_step) if t.exit_at_step else t.max_steps
        result = TrainResult(step=self.step, is_main=self.runtime.is_main)
        start = time.perf_counter()
        self._announce(stop)
        if self.step == 0 and t.eval_at_start:
            result.evals.append((0, self._evaluate_and_log()))
        if self.probe is not None and self.step < stop and self.step % t.log_interval == 0:
            self._probe_churn()  # the selections the first log's churn compares with (aoe_ep/train/diagnostics.py)
        bar = self.bar = progress_bar(t.max_steps, self.step, self.runtime.is_main)
        window: list[StepRecord] = []
        window_start = time.perf_counter()
        while self.step < stop:
            record = self._train_step(timed=(self.step + 1) % t.log_interval == 0 or self.step + 1 == stop)
            result.history.append(record)
            window.append(record)
            bar.update(1)
            step_tokens_per_s = len(window) * self.plan.tokens_per_step / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{step_tokens_per_s:,.0f}", refresh=False)
            last = self.step == stop
            if self.step % t.log_interval == 0 or last:
                self._log_window(window, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
            if self.step % t.eval_interval == 0 or last:
                result.evals.append((self.step, self._evaluate_and_log(bar)))
            if self.step % t.save_interval == 0 or last:
                result.checkpoint = self.save() or result.checkpoint
        bar.close()
        self.logger.flush()
        result.step, result.seconds = self.step, time.perf_counter() - start
        return result

    def _train_step(self, timed: bool) -> StepRecord:
        """One optimiser step; `timed`: the MoE layers synchronise the accelerator to time their phases."""
        model, plan, rt = self.dp.module, self.plan, self.runtime
        model.train()
        ctx = self._step_context(timed)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, device=rt.device, dtype=torch.float64)  # Σ lm loss, Σ aux loss over micro-batches
        health = StepHealth(len(self.moe_layers), rt.device)
        infos = []  # added to the logged statistics only if the step is applied
        for micro in range(plan.num_micro_batches):
            batch = collate(self.train_ds, plan.indices(self.consumed_samples, micro), rt.device)
            last = micro == plan.num_micro_batches - 1
            with self.dp.sync_context(last):
                with self._autocast():
                    out = model(batch.tokens, ctx=ctx)
                    ce_sum, count = token_cross_entropy(out.logits, batch.labels, batch.loss_mask)
                    lm = ce_sum / count.clamp_min(1.0)
                    loss = (lm + out.aux_loss) / plan.num_micro_batches
                loss.backward()
            sums += torch.stack([lm.detach(), out.aux_loss.detach()]).double()
            health.add(out.moe)
            infos.append(out.moe)
        self.dp.reduce_expert_grads()
        grad_norm = self.dp.clip_grad_norm_(self.cfg.train.grad_clip)
        # The one world-wide reduction of the step: the losses, the flags every rank's verdict is read from and,
        # under `moe.balance: bias` or threshold selection, the step's expert counts and its token count (each EP
        # rank holds its group's: ep_size times each).
        packed = health.packed(sums / plan.num_micro_batches, grad_norm)
        counts_LE = step_token_counts(infos, self.moe_layers, rt.device) if self.moe_layers else None
        balance = counts_LE is not None and needs_step_counts(self.moe_layers)
        reduced = all_reduce_(
            torch.cat([packed, counts_LE.flatten(), step_tokens(infos, rt.device)]) if balance else packed
        )
        v = verdict(reduced[: packed.numel()], rt.world_size, rt.ep_size)
        self.scheduler.step(1)
        if v.good:
            self.optimizer.step()
            if balance:
                global_LE = reduced[packed.numel() : -1].view_as(counts_LE) / rt.ep_size
                update_balancing(self.moe_layers, global_LE, reduced[-1] / rt.ep_size)
            for micro_infos in infos:
                self.moe_stats.add(micro_infos, timed)
            if counts_LE is not None:
                self.expert_load.add(counts_LE)
        self.step += 1
        self.consumed_samples += plan.global_samples
        self.bad_steps.update(v)
        if not v.good:
            if rt.is_main:
                print(self.bad_steps.describe(self.step, v, grad_norm))
            latest = ckpt.latest_checkpoint(self.ckpt_root)
            self.bad_steps.raise_if_exhausted(self.step, v, grad_norm, str(latest) if latest else None)
        return StepRecord(
            step=self.step,
            loss=v.loss,
            aux_loss=v.aux_loss,
            grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"],
            skipped=not v.good,
        )

    def evaluate(self) -> Optional[float]:
        """Token-mean cross-entropy over `eval_steps` global batches of the validation set (the same samples at
        every evaluation, whatever the number of ranks); None when the validation split is empty."""
        if self.eval_batches == 0:
            return None
        sums = validation_sums(
            self.dp.model,
            self.moe_layers,
            self.valid_ds,
            self.plan,
            self.eval_batches,
            self.runtime.device,
            self.autocast_dtype,
            ctx=self._step_context(timed=False),
        )
        all_reduce_(sums)
        return float(sums[0] / sums[1].clamp_min(1.0))

    def _evaluate_and_log(self, bar=None) -> Optional[float]:
        loss = self.evaluate()
        if loss is None:
            return None
        ppl = math.exp(min(loss, 50.0))
        self.logger.log(self.step, {"valid/loss": loss, "valid/ppl": ppl})
        if self.runtime.is_main:
            message = f"step {self.step}: validation loss {loss:.4f}, perplexity {ppl:.2f}"
            (bar.write if bar is not None else print)(message)
        return loss

    def _log_window(self, window: list[StepRecord], seconds: float) -> None:
        stats, timing = self.moe_stats.reduce(self.runtime)
        erc = self.moe_stats.reduce_erc(self.runtime)
        comm = comm_scalars(self.moe_layers, len(window))
        churn = self._probe_churn() if self.probe is not None else None
        if not self.runtime.is_main:
            return
        tokens_per_s = len(window) * self.plan.tokens_per_step / max(seconds, 1e-9)
        applied = [r for r in window if not r.skipped]  # a skipped step's NaN would hide the window's figures
        scalars = (
            {
                "train/loss": sum(r.loss for r in applied) / len(applied),
                "train/aux_loss": sum(r.aux_loss for r in applied) / len(applied),
                "train/grad_norm": sum(r.grad_norm for r in applied) / len(applied),
            }
            if applied
            else {}
        )
        scalars.update(
            {
                "train/skipped_steps": float(self.bad_steps.skipped),
                "train/lr": window[-1].lr,
                "train/consumed_tokens": float(self.consumed_samples * self.plan.seq_len),
                "perf/tokens_per_s": tokens_per_s,
                "perf/step_seconds": seconds / len(window),
                "perf/peak_memory_gib": peak_memory_bytes(self.runtime.device) / 2**30,
            }
        )
        if self.peak_flops:
            scalars["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.runtime.world_size * self.peak_flops)
        scalars.update(
            moe_scalars(
                stats, timing, self.runtime.ep_size, placements=[layer.placement for layer in self.moe_layers], erc=erc
            )
        )
        # AoE diagnostics: score margin, top-K churn, dead experts, wasted precompute (plain scalars per layer)
        if stats:
            scalars.update(diagnostic_scalars(stats, self.cfg.moe.scorer, churn))
        scalars.update(balancing_scalars(self.moe_layers, stats))
        scalars.update(comm)
        self.logger.log(self.step, scalars, images={"moe/load_heatmap": load_heatmap(stats)} if stats else None)

    def _probe_churn(self) -> Optional[list[float]]:
        """Churn per MoE layer of the fixed probe batch since the last probe (collective over the world)."""
        return self.probe.update(
            self.dp.model, self.moe_layers, autocast=self._autocast, ctx=self._step_context(timed=False)
        )

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (collective). None if that step's checkpoint already exists."""
        rt = self.runtime
        if self.bias_balancing:
            check_replicas_agree(
                {f"MoE layer {i} expert_bias": layer.expert_bias for i, layer in enumerate(self.moe_layers)}
            )
        if self.threshold_balancing:
            check_replicas_agree(
                {
                    f"MoE layer {i} threshold_lambda": layer.threshold_lambda.view(1)
                    for i, layer in enumerate(self.moe_layers)
                }
            )
        self._refuse_nonfinite_parameters()
        progress = {"step": self.step, "consumed_samples": self.consumed_samples}
        state = ckpt.training_state(self.dp.model, self.optimizer, self.scheduler, progress, rt)
        meta = dict(
            progress,
            world_size=rt.world_size,
            expert_parallel_size=rt.ep_size,
            skipped_steps=self.bad_steps.skipped,
            consumed_tokens=self.consumed_samples * self.plan.seq_len,
        )
        recent = None
        if self.moe_layers:
            counts, recent, steps = self.expert_load.reduce(rt)
            meta.update(place.load_meta(counts, recent, steps, self.load_since, self.cfg.parallel.placement_half_life))
            meta.update(place.placement_meta(self.cfg.parallel.expert_placement, self.moe_layers))
            self.load_since = self.step
        path = ckpt.save_checkpoint(
            self.ckpt_root, self.step, state, rt, meta, self._config_yaml(), keep=self.cfg.train.keep_checkpoints
        )
        if recent is not None and self._balanced() and float(recent.sum()) > 0:
            self._replace(recent)
        return path if path is not None else self.ckpt_root / ckpt.step_name(self.step)

    def _refuse_nonfinite_parameters(self) -> None:
        """Collective: a checkpoint is never written from non-finite parameters; the run stops instead and
        `latest` keeps naming the last finite checkpoint."""
        bad = torch.zeros(1, device=self.runtime.device)
        for p in self.dp.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).sum()
        if all_reduce_(bad).item() == 0:
            return
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        kept = f"`latest` still names {latest}" if latest is not None else "no checkpoint was written"
        raise TrainingError(
            f"step {self.step}: the parameters are not finite, so no checkpoint is written; {kept}; "
            f"resume from it with a smaller train.lr or train.grad_clip"
        )

    def _replace(self, counts) -> None:
        """After a save under `balanced`: re-place the experts by the load just recorded (collective)."""
        placements = place.choose(counts, self.runtime.ep_size)
        lines = place.describe(self.moe_layers, placements, counts)
        if place.apply_placements(self.moe_layers, placements, self.optimizer, self.runtime) and self.runtime.is_main:
            print(
                "\n".join(
                    [
                        f"step {self.step}: expert placement: balanced, from the load since the last "
                        f"checkpoint (half-life {self.cfg.parallel.placement_half_life} steps):",
                        *lines,
                    ]
                )
            )

    def _config_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self.cfg), sort_keys=False)

    def _announce(self, stop: int) -> None:
        if not self.runtime.is_main:
            return
        cfg, rt, plan = self.cfg, self.runtime, self.plan
        kind = cfg.moe.scorer if cfg.model.ffn == "moe" else "dense"
        print(
            f"aoe-ep train: {kind} decoder, {self.num_params / 1e6:,.2f}M parameters on this rank; "
            f"{rt.world_size} rank(s) on {rt.device.type} (EP {rt.ep_size}, dense weights: {self.dp.kind}); "
            f"{plan.tokens_per_step:,} tokens/step = {plan.num_micro_batches} micro-batch(es) of "
            f"{plan.micro_batch_size} x {plan.seq_len} per rank; {type(self.optimizer).__name__}; "
            f"precision {self.autocast_dtype or torch.float32}; steps {self.step} -> {stop}; out_dir {self.out_dir}"
        )
        if self.resumed_from is not None:
            print(f"resumed from {ckpt.describe(self.resumed_from)}")
            print(
                "changed since that checkpoint: "
                + ("; ".join(self.config_changes) if self.config_changes else "nothing")
            )
        if self.placement_note:
            print("\n".join(self.placement_note))
        if cfg.model.ffn == "moe" and rt.ep_size >= 4 and cfg.moe.dispatcher == "allgather":
            print(
                f"aoe-ep train: note: at EP {rt.ep_size} the allgather dispatcher sends about (EP-1)·d values per "
                f"token against alltoall's under K·(2d + d_low); consider --set moe.dispatcher=alltoall"
            )

    # ------------------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.logger.close()
        self._release_lock()
        teardown(self.runtime)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Interrupted(Exception):
    """Ctrl-C (SIGINT) during training; the message names the step, the last checkpoint and how to resume."""


def train(cfg: Config, resume: Optional[str] = None, data: Optional[DataBuilders] = None) -> TrainResult:
    try:
        trainer = Trainer(cfg, resume=resume, data=data)
    except KeyboardInterrupt:
        raise Interrupted("interrupted during start-up, before any step; nothing was trained") from None
    with trainer:
        try:
            return trainer.fit()
        except KeyboardInterrupt:
            if getattr(trainer, "bar", None) is not None:
                trainer.bar.close()  # the message goes on a line of its own
            try:
                latest = ckpt.latest_checkpoint(trainer.ckpt_root)
            except ckpt.CheckpointError:
                latest = None
            where = (
                f"the last checkpoint is {latest} (step {ckpt.read_meta(latest)['step']}); continue from it with "
                f"the same command and --resume"
                if latest is not None
                else "no checkpoint was written yet; start again without --resume"
            )
            raise Interrupted(f"interrupted at step {trainer.step}; {where}") from None
