"""Single-process training on this machine: the stand-in for ``dlmoe train`` until the Ray Train + DeepSpeed
path lands ("Distributed training"). It uses the same objective, noise and balancing as the distributed loop will.

The data is a tokenized dataset (``data.uri``, read through ``data_pipeline.stream.TokenStream`` exactly as a
distributed worker of rank 0 of 1 reads it), or, with ``data.uri`` empty, the embedded default: the Python
standard library's own source files, byte-level tokenized and packed into rows of ``seq_len`` separated by EOS
(real text that is always present), in a seeded permutation per epoch. Either way (epoch, global sample index)
drives the masking noise.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline.stream import TokenStream
from data_pipeline.tokenize import default_corpus
from data_pipeline.tokenizers import Tokenizer, byte_tokenizer, load_tokenizer
from dlmoe.config import JobConfig
from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.errors import ConfigError, DataError
from dlmoe.export import save_pretrained
from dlmoe.model import build_model
from dlmoe.model.balance import AuxFreeBalancer, expert_load
from dlmoe.model.config import ModelConfig
from dlmoe.train.schedule import lr_at


def stdlib_byte_rows(seq_len: int, eos_id: int, max_bytes: int = 4_000_000) -> torch.Tensor:
    """Rows [N, seq_len] of the default corpus (``data_pipeline.tokenize.default_corpus``) as bytes, documents
    separated by ``eos_id``, in its fixed (sorted) file order; the last partial row is dropped."""
    files = [Path(f) for f in default_corpus()]
    chunks: list[torch.Tensor] = []
    total = 0
    for path in files:
        data = path.read_bytes()
        chunks.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64))
        chunks.append(torch.tensor([eos_id]))
        total += len(data) + 1
        if total >= max_bytes:
            break
    stream = torch.cat(chunks)
    rows = stream.numel() // seq_len
    if rows == 0:
        raise DataError(f"the embedded corpus ({len(files)} files) is shorter than one row of {seq_len} tokens")
    return stream[: rows * seq_len].view(rows, seq_len)


@dataclass
class StepBatch:
    """One global batch: its epoch, the global sample indices, the rows and (SFT) the prompt lengths."""

    epoch: int
    sample_index: torch.Tensor
    input_ids: torch.Tensor
    prompt_len: torch.Tensor | None = None


def embedded_batches(job: JobConfig, eos_id: int) -> Iterator[StepBatch]:
    """Global batches of the embedded corpus: a seeded permutation per epoch, the remainder of an epoch unused."""
    rows = stdlib_byte_rows(job.data.seq_len, eos_id)
    gbs = job.data.global_batch_size
    steps_per_epoch = rows.shape[0] // gbs
    if steps_per_epoch == 0:
        raise DataError(f"the corpus has {rows.shape[0]} rows, fewer than one global batch of {gbs}")
    for epoch in itertools.count():
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(job.data.seed + epoch))
        for step in range(steps_per_epoch):
            sample_index = torch.arange(step * gbs, (step + 1) * gbs)
            yield StepBatch(epoch, sample_index, rows[order[sample_index]])


def job_tokenizer(job: JobConfig, config: ModelConfig) -> Tokenizer:
    """The job's tokenizer (``data.tokenizer``: ``byte`` or a tokenizer.json path) with the model's special ids."""
    if job.data.tokenizer == "byte":
        return byte_tokenizer()
    return load_tokenizer(job.data.tokenizer, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                          mask_id=config.mask_token_id)


def dataset_batches(job: JobConfig, config: ModelConfig, tokenizer: Tokenizer) -> Iterator[StepBatch]:
    """Global batches of the tokenized dataset at ``data.uri``, checked against the job and the model."""
    stream = TokenStream(job.data.uri, global_batch_size=job.data.global_batch_size, seed=job.data.seed,
                         seq_len=job.data.seq_len, tokenizer_fingerprint=tokenizer.fingerprint,
                         kind=job.objective.kind, endpoint_url=job.data.endpoint_url or None)
    mask_id = stream.manifest.tokenizer.get("mask_id")
    if mask_id != config.mask_token_id:
        raise ConfigError(f"the dataset {job.data.uri} masks with id {mask_id}, the model with "
                          f"{config.mask_token_id}", key="model.mask_token_id")
    for batch in stream:
        prompt_len = batch.get("prompt_len")
        yield StepBatch(int(batch["epoch"]), torch.from_numpy(batch["sample_index"]),
                        torch.from_numpy(batch["input_ids"]),
                        None if prompt_len is None else torch.from_numpy(prompt_len))


@dataclass
class LocalRunResult:
    run_name: str
    final_step: int
    losses: list[float] = field(default_factory=list)
    tokens_per_second: float = 0.0
    output_dir: str = ""
    export_dir: str = ""


def run_local_training(job: JobConfig, *, progress: bool = True) -> LocalRunResult:
    """Train ``job`` in this process; write the final weights, a summary and (when ``export.enabled``) the Hugging
    Face folder with the job's tokenizer under ``{checkpoint.storage}/{run_name}/final/``."""
    if job.parallel.num_workers != 1 or job.parallel.ep_size != 1:
        raise ConfigError("single-process training needs parallel.num_workers=1 and parallel.ep_size=1",
                          key="parallel.num_workers")
    model_cfg = job.model.to_model_config()
    tokenizer = job_tokenizer(job, model_cfg)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer ({job.data.tokenizer}) has {tokenizer.vocab_size} tokens, more than "
                          f"vocab_size {model_cfg.vocab_size}", key="model.vocab_size")
    if job.data.uri:
        batches = dataset_batches(job, model_cfg, tokenizer)
    elif job.objective.kind == "sft" or job.data.tokenizer != "byte":
        raise ConfigError("the embedded corpus is byte-level pretraining text; SFT or another tokenizer needs a "
                          "tokenized dataset in data.uri (dlmoe tokenize)", key="data.uri")
    else:
        batches = embedded_batches(job, model_cfg.eos_token_id)
    torch.manual_seed(job.train.seed)
    model = build_model(model_cfg, seed=job.train.seed)
    model.train()
    balance = job.objective.balance
    objective = MaskedDiffusionObjective(ObjectiveSettings(
        mask_token_id=model_cfg.mask_token_id, seed=job.data.seed, global_batch_size=job.data.global_batch_size,
        sft=job.objective.kind == "sft", eps=job.objective.eps,
        variable_length_prob=job.objective.variable_length_prob, stratified_t=job.objective.stratified_t,
        aux_loss_coef=balance.aux_loss_coef if balance.mode == "aux_loss" else 0.0,
        z_loss_coef=balance.z_loss_coef if balance.mode != "none" else 0.0,
        global_balance_counts=balance.global_counts,
    ))
    balancer = AuxFreeBalancer(model, balance.bias_update_rate) if balance.mode == "aux_free" else None
    t = job.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)

    gbs, mbs = job.data.global_batch_size, job.data.micro_batch_size
    result = LocalRunResult(run_name=job.run_name, final_step=0)
    tokens_seen, start = 0, time.perf_counter()
    counts_LE = torch.zeros(0)
    bar = tqdm(range(t.steps), desc=f"train {job.run_name}", disable=not progress, unit="step")
    for step in bar:
        global_batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps,
                                schedule=t.schedule, min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        step_counts = []
        for micro in range(0, gbs, mbs):
            part = slice(micro, micro + mbs)
            prompt_len = None if global_batch.prompt_len is None else global_batch.prompt_len[part]
            out = objective(model, global_batch.input_ids[part], global_batch.sample_index[part], global_batch.epoch,
                            prompt_len_B=prompt_len)
            (out.loss * (mbs / gbs)).backward()
            step_loss += float(out.loss.detach()) * mbs / gbs
            tokens_seen += mbs * out.seq_len
            step_counts.append(torch.stack([s.tokens_per_expert_E for s in out.router_stats]))
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        counts_LE = torch.stack(step_counts).sum(0)
        if balancer is not None:
            balancer.update(counts_LE)
        result.losses.append(step_loss)
        result.final_step = step + 1
        if step % t.log_every == 0 or step + 1 == t.steps:
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / (time.perf_counter() - start):.0f}")
    result.tokens_per_second = tokens_seen / (time.perf_counter() - start)

    out_dir = Path(job.checkpoint.storage) / job.run_name / "final"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    load = expert_load(counts_LE)
    (out_dir / "summary.json").write_text(json.dumps({
        "run_name": job.run_name, "final_step": result.final_step, "losses": result.losses,
        "tokens_per_second": result.tokens_per_second, "config": job.to_dict(),
        "expert_load": {"share": load.share_LE.tolist(), **load.as_metrics()},
    }, indent=1))
    result.output_dir = str(out_dir)
    if job.export.enabled:
        if job.export.output:
            warnings.warn(f"export.output={job.export.output!r} is ignored by single-process training; the "
                          f"Hugging Face folder goes to {out_dir / 'hf'}", stacklevel=2)
        result.export_dir = str(save_pretrained(model, out_dir / "hf", tokenizer=tokenizer,
                                                flavor=job.model.flavor, step=result.final_step,
                                                source_run=job.run_name))
    return result
