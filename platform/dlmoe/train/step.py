"""One training step on one rank, and what it needs: the job's tokenizer and objective settings, micro-batches, the
step itself (``train_step``) and the step as the loop runs it (``StepRunner``: the step, the all-reduce of its
losses, expert counts and preemption flags, aux-free balancing, throughput).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from data_pipeline.tokenizers import Tokenizer, byte_tokenizer, load_tokenizer
from dlmoe.config import JobConfig
from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.diffusion.blocks import BlockSchedule
from dlmoe.model import ModelConfig
from dlmoe.model.balance import AuxFreeBalancer
from dlmoe.monitor.metrics import bucket_counts

if TYPE_CHECKING:  # preemption.py imports Ray Train, which the step's other users need not load
    from dlmoe.train.preemption import PreemptionWatch


def job_tokenizer(job: JobConfig, config: ModelConfig) -> Tokenizer:
    """The job's tokenizer (``data.tokenizer``: ``byte`` or a tokenizer.json path) with the model's special ids."""
    if job.data.tokenizer == "byte":
        return byte_tokenizer()
    return load_tokenizer(job.data.tokenizer, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                          mask_id=config.mask_token_id)


def objective_settings(job: JobConfig) -> ObjectiveSettings:
    """The masked-diffusion objective's settings for ``job`` (noise, SFT, balance-loss coefficients)."""
    balance = job.objective.balance
    return ObjectiveSettings(
        mask_token_id=job.model.mask_token_id, seed=job.data.seed, global_batch_size=job.data.global_batch_size,
        sft=job.objective.kind == "sft", eps=job.objective.eps,
        variable_length_prob=job.objective.variable_length_prob, stratified_t=job.objective.stratified_t,
        aux_loss_coef=balance.aux_loss_coef if balance.mode == "aux_loss" else 0.0,
        z_loss_coef=balance.z_loss_coef if balance.mode != "none" else 0.0,
        global_balance_counts=balance.global_counts, t_min=job.objective.t_min, t_max=job.objective.t_max,
        document_attention=job.objective.document_attention, block_size=job.objective.block_size)


def block_schedule(job: JobConfig) -> BlockSchedule | None:
    """The job's block-level WSD schedule (``objective.block_schedule``), or None when it is off."""
    bs = job.objective.block_schedule
    if not bs.enabled:
        return None
    return BlockSchedule(total_steps=job.train.steps, warmup_steps=bs.warmup_steps, decay_steps=bs.decay_steps,
                         start_block_size=bs.start_block_size, final_block_size=bs.final_block_size)


def micro_batches(batch: dict[str, Any], micro: int, device: torch.device | str
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """A batch from ``TokenStream`` in micro-batches of ``micro`` rows: token ids (on ``device``), global sample
    indices, for SFT data prompt lengths and, where the data records them, document ids."""
    prompt_len, doc_ids = batch.get("prompt_len"), batch.get("doc_ids")
    for lo in range(0, len(batch["input_ids"]), micro):
        part = slice(lo, lo + micro)
        yield (torch.from_numpy(batch["input_ids"][part]).to(device), torch.from_numpy(batch["sample_index"][part]),
               None if prompt_len is None else torch.from_numpy(prompt_len[part]),
               None if doc_ids is None else torch.from_numpy(doc_ids[part]))


def train_step(engine: Any, objective: Any, batch: dict[str, Any], micro: int, accumulation_steps: int,
               mask_bins: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One optimizer step on this rank's share of a global batch, in micro-batches of ``micro`` (the engine steps
    the optimizer at the accumulation boundary). Returns the loss, balance loss and z-loss averaged over the
    micro-batches, the token counts [mask-ratio bins, layers, experts] (``None`` for a model without MoE layers),
    both on the engine's device, and the number of tokens trained on."""
    device = engine.device
    losses = torch.zeros(3, dtype=torch.float64, device=device)
    counts_RLE: torch.Tensor | None = None
    tokens = 0
    for input_ids, sample_index, prompt_len, doc_ids in micro_batches(batch, micro, device):
        out = objective(engine, input_ids, sample_index, batch["epoch"], prompt_len_B=prompt_len, doc_ids_BL=doc_ids)
        engine.backward(out.loss)
        engine.step()
        losses += torch.stack([out.loss.detach(), out.balance_loss, out.z_loss]).to(torch.float64) / accumulation_steps
        if out.router_stats:
            counts = bucket_counts(out.router_stats, out.t_B, mask_bins)
            counts_RLE = counts if counts_RLE is None else counts_RLE + counts
        tokens += out.seq_len * micro
    return losses, counts_RLE, tokens


@dataclass
class StepOutcome:
    """A finished step, the same on every rank: its losses averaged over the ranks, the expert counts summed over
    them, what the preemption flags call for, and the throughput so far."""

    step: int  # 1-based: the number of steps done
    loss: float
    balance_loss: float
    z_loss: float
    counts_RLE: torch.Tensor | None  # [mask-ratio bins, MoE layers, experts]
    event: str | None  # ``sigterm``, ``preemption`` or None (``PreemptionWatch.event``)
    tokens_per_s: float  # all ranks, since this launch started
    epoch: int  # of the step's batch
    next_sample: int  # the first global sample of the next batch in ``epoch``
    block_size: int = 0  # block diffusion's block size in this step (0: full-sequence diffusion)


class Throughput:
    """Tokens per second of all ranks: since the launch started, and steady-state over the second half of the
    launch's steps (the first ones pay for allocation and warm-up, and for Ray's own actors still starting on the
    same cores)."""

    def __init__(self, world: int, first_step: int, steps: int) -> None:
        self.world = world
        self.started = time.perf_counter()
        self.tokens = 0
        self.measure_from = first_step + max(1, (steps - first_step) // 2)
        self.warm_time, self.warm_tokens = self.started, 0

    def add(self, step: int, tokens: int) -> float:
        """Count the tokens of the finished step ``step`` (1-based); returns the rate since the start."""
        self.tokens += tokens
        now = time.perf_counter()
        if step == self.measure_from:
            self.warm_time, self.warm_tokens = now, self.tokens
        return self.tokens * self.world / (now - self.started)

    def steady(self) -> float:
        elapsed = time.perf_counter() - self.warm_time
        return (self.tokens - self.warm_tokens) * self.world / elapsed if elapsed > 0 else 0.0


class StepRunner:
    """The step as every rank runs it in the loop: ``train_step``, aux-free bias updates on this rank's counts,
    then one all-reduce of the losses and preemption flags (and one of the expert counts)."""

    def __init__(self, job: JobConfig, engine: Any, model: Any, world: int, watch: PreemptionWatch,
                 throughput: Throughput) -> None:
        self.job, self.engine, self.world, self.watch, self.throughput = job, engine, world, watch, throughput
        self.objective = MaskedDiffusionObjective(objective_settings(job))
        self.schedule = block_schedule(job)
        balance = job.objective.balance
        self.balancer = AuxFreeBalancer(model, balance.bias_update_rate) if balance.mode == "aux_free" else None

    def run(self, batch: dict[str, Any], step: int) -> StepOutcome:
        """Train on ``batch`` as step ``step`` (1-based)."""
        job = self.job
        if self.schedule is not None:  # a pure function of the step, like the learning rate: resumes exactly
            self.objective.block_size = self.schedule.block_size_at(step - 1, job.data.seq_len)
        losses, counts_RLE, seen = train_step(self.engine, self.objective, batch, job.micro_batch_per_worker,
                                              job.accumulation_steps, job.monitor.mask_buckets)
        # loss, balance loss, z-loss (averaged over micro-batches), then the preemption flags (summed over ranks)
        parts = torch.cat([losses, self.watch.flags().to(losses.device)])
        if self.balancer is not None and counts_RLE is not None:
            self.balancer.update(counts_RLE.sum(0))  # this rank's counts: the balancer sums them over the ranks
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(parts)
            parts[:3] /= self.world
            if counts_RLE is not None:
                dist.all_reduce(counts_RLE)
        gbs = job.data.global_batch_size
        return StepOutcome(step=step, loss=float(parts[0]), balance_loss=float(parts[1]), z_loss=float(parts[2]),
                           counts_RLE=counts_RLE, event=self.watch.event(parts[3:]),
                           tokens_per_s=self.throughput.add(step, seen), epoch=int(batch["epoch"]),
                           next_sample=(int(batch["sample_index"][0]) // gbs + 1) * gbs,
                           block_size=self.objective.block_size)
