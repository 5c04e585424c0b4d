"""Single-process training on this machine: the stand-in for ``dlmoe train`` until the Ray Train + DeepSpeed
path lands ("Distributed training"). It uses the same objective, noise and balancing as the distributed loop will.

The corpus is the embedded default: the Python standard library's own source files, byte-level tokenized and
packed into rows of ``seq_len`` separated by EOS (real text that is always present). Sample order is a seeded
permutation per epoch, and global sample indices drive the masking noise.
"""

from __future__ import annotations

import json
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.config import JobConfig
from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.errors import ConfigError, DataError
from dlmoe.export import save_pretrained
from dlmoe.model import build_model
from dlmoe.model.balance import AuxFreeBalancer, expert_load
from dlmoe.model.config import BYTE_VOCAB_SIZE
from dlmoe.train.schedule import lr_at


def stdlib_byte_rows(seq_len: int, eos_id: int, max_bytes: int = 4_000_000) -> torch.Tensor:
    """Rows [N, seq_len] of the stdlib's .py sources as bytes, documents separated by ``eos_id``, in a fixed
    (sorted) file order; the last partial row is dropped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise DataError(f"no Python sources found under {root} for the embedded default corpus")
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
        raise DataError(f"the embedded corpus under {root} is shorter than one row of {seq_len} tokens")
    return stream[: rows * seq_len].view(rows, seq_len)


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
    Face folder with the byte-level tokenizer under ``{checkpoint.storage}/{run_name}/final/``."""
    if job.data.uri:
        raise ConfigError("single-process training reads only the embedded default corpus until the data "
                          "pipeline lands; leave data.uri empty", key="data.uri")
    if job.train.num_workers != 1 or job.parallel.ep_size != 1:
        raise ConfigError("single-process training needs train.num_workers=1 and parallel.ep_size=1",
                          key="train.num_workers")
    model_cfg = job.model.to_model_config()
    if model_cfg.vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError(f"the byte-level corpus needs vocab_size >= {BYTE_VOCAB_SIZE}", key="model.vocab_size")
    torch.manual_seed(job.train.seed)
    model = build_model(model_cfg, seed=job.train.seed)
    model.train()
    rows = stdlib_byte_rows(job.data.seq_len, model_cfg.eos_token_id)
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
    steps_per_epoch = rows.shape[0] // gbs
    if steps_per_epoch == 0:
        raise DataError(f"the corpus has {rows.shape[0]} rows, fewer than one global batch of {gbs}")
    result = LocalRunResult(run_name=t.run_name, final_step=0)
    order = torch.empty(0, dtype=torch.int64)
    tokens_seen, start = 0, time.perf_counter()
    counts_LE = torch.zeros(0)
    bar = tqdm(range(t.steps), desc=f"train {t.run_name}", disable=not progress, unit="step")
    for step in bar:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if step_in_epoch == 0:
            order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(job.data.seed + epoch))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps,
                                schedule=t.schedule, min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        step_counts = []
        for micro in range(0, gbs, mbs):
            sample_index = torch.arange(step_in_epoch * gbs + micro, step_in_epoch * gbs + micro + mbs)
            batch = rows[order[sample_index]]
            out = objective(model, batch, sample_index, epoch)
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

    out_dir = Path(job.checkpoint.storage) / t.run_name / "final"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    load = expert_load(counts_LE)
    (out_dir / "summary.json").write_text(json.dumps({
        "run_name": t.run_name, "final_step": result.final_step, "losses": result.losses,
        "tokens_per_second": result.tokens_per_second, "config": job.to_dict(),
        "expert_load": {"share": load.share_LE.tolist(), **load.as_metrics()},
    }, indent=1))
    result.output_dir = str(out_dir)
    if job.export.enabled:
        if job.export.output:
            warnings.warn(f"export.output={job.export.output!r} is ignored by single-process training; the "
                          f"Hugging Face folder goes to {out_dir / 'hf'}", stacklevel=2)
        result.export_dir = str(save_pretrained(model, out_dir / "hf", tokenizer=byte_tokenizer(),
                                                flavor=job.model.flavor, step=result.final_step,
                                                source_run=t.run_name))
    return result
