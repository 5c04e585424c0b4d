"""Validation during training (``data.validation``, ``train.eval_every``): the masked-diffusion loss on a fixed
held-out set, with fixed noise.

The set is the first ``train.eval_batches`` global batches of the validation dataset in its epoch-0 order, read once
when a worker starts; each rank holds its slice, exactly as in training. The noise of a row (t and its mask) is a
pure function of (data.seed, epoch, sample index), so every evaluation masks every row the same way: the curve
moves only with the weights, and one worker or many give the same values. The variable-length cut and the
balance losses are left out; the value is the diffusion loss averaged over the set's rows, all ranks together.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline.stream import TokenStream
from dlmoe.config import JobConfig
from dlmoe.diffusion import MaskedDiffusionObjective
from dlmoe.train.step import micro_batches, objective_settings


class Validation:
    def __init__(self, job: JobConfig, rank: int, world: int, tokenizer_fingerprint: str) -> None:
        stream = TokenStream(job.validation_uri, global_batch_size=job.data.global_batch_size, seed=job.data.seed,
                             rank=rank, world_size=world, seq_len=job.data.seq_len,
                             tokenizer_fingerprint=tokenizer_fingerprint, kind=job.objective.kind,
                             endpoint_url=job.endpoint_url, max_batches=job.train.eval_batches)
        self.batches = list(stream)
        self.micro = job.micro_batch_per_worker
        self.world = world
        self.objective = MaskedDiffusionObjective(dataclasses.replace(
            objective_settings(job), variable_length_prob=0.0, aux_loss_coef=0.0, z_loss_coef=0.0))

    @torch.no_grad()
    def evaluate(self, engine: Any) -> float:
        """The validation loss of the model now — a DeepSpeed engine or the bare model (under expert parallelism
        a collective: every rank calls it at the same step)."""
        device = next(engine.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss × rows, rows
        engine.eval()
        try:
            for batch in self.batches:
                for rows, sample_index, prompt_len, doc_ids in micro_batches(batch, self.micro, device):
                    out = self.objective(engine, rows, sample_index, batch["epoch"], prompt_len_B=prompt_len,
                                         doc_ids_BL=doc_ids)
                    total += torch.stack([out.diffusion_loss.double() * len(rows),
                                          torch.tensor(float(len(rows)), dtype=torch.float64, device=device)])
        finally:
            engine.train()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])
