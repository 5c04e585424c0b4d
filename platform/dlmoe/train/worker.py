"""The per-worker training function run by Ray Train on every rank (DESIGN.md habit 3): config → model → engine →
resume → stream → steps, with the side jobs as components called at known points (``hooks.py``).

Each rank reads its slice of every global batch from ``TokenStream`` (the masking noise of a row is a pure function
of (seed, epoch, global sample index), so one worker and many train on the same batches with the same noise), builds
the model from the same seed, and hands it to the parallelize step. A restarted worker group (a failure under
``train.max_failures``, or a relaunch of the same run name) loads the newest checkpoint that verifies — weights,
optimizer, schedule, data position (``dlmoe.checkpointing``) — and carries on.
"""

from __future__ import annotations

from typing import Any

import ray.train
import torch

from data_pipeline.stream import TokenStream
from dlmoe import checkpointing
from dlmoe.checkpointing import CheckpointState
from dlmoe.config import job_from_dict
from dlmoe.export.remote import load_weights
from dlmoe.model import build_model
from dlmoe.parallel import full_state_dict, parallelize, params_sha256
from dlmoe.tracking import make_tracker
from dlmoe.train.console import WorkerConsole
from dlmoe.train.exports import CheckpointExports
from dlmoe.train.hooks import RunEnd, build_hooks, latest_val
from dlmoe.train.preemption import PreemptionWatch
from dlmoe.train.step import StepRunner, Throughput, job_tokenizer
from dlmoe.train.validation import Validation


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every rank. ``config``: ``job`` (the resolved job as a dict), ``dataset``
    (a tokenized dataset URI), ``use_gpu``, ``threads`` (torch threads of a CPU worker), ``mlflow_run_id``,
    ``console`` (the driver's ``ConsoleChannel``), ``progress``, ``verbose`` (Ray shows the workers' output: no
    warning is relayed), ``unigram_baseline`` (the held-out unigram cross-entropy, or ``None``)."""
    job = job_from_dict(config["job"])
    if not config["use_gpu"]:
        torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    console = WorkerConsole(config["console"], rank)
    if not config["verbose"]:
        console.relay_warnings()
    model_config = job.model.to_model_config()
    tokenizer = job_tokenizer(job, model_config)
    torch.manual_seed(job.train.seed)
    model = build_model(model_config, seed=job.train.seed)
    if job.model.init_from and not checkpointing.find_checkpoints(checkpointing.run_folder(job)):
        load_weights(model, job.model.init_from, job.endpoint_url)  # a run that has checkpoints resumes from them
    model.activation_checkpointing = job.train.activation_checkpointing
    engine = parallelize(model, job, use_gpu=config["use_gpu"])
    state = checkpointing.resume(engine, job) or CheckpointState.new(job)

    steps, run_id = job.train.steps, config.get("mlflow_run_id")
    stream = TokenStream(config["dataset"], global_batch_size=job.data.global_batch_size, seed=job.data.seed,
                         rank=rank, world_size=world, start_sample=state.sample_in_epoch, epoch=state.epoch,
                         seq_len=job.data.seq_len, tokenizer_fingerprint=tokenizer.fingerprint,
                         kind=job.objective.kind, endpoint_url=job.endpoint_url)
    tracker = make_tracker(job, rank, run_id)
    validation = Validation(job, rank, world, tokenizer.fingerprint) if job.train.eval_every else None
    exports = CheckpointExports(job, tracker, run_id) if rank == 0 and job.export.enabled else None
    hooks = build_hooks(job, rank=rank, world=world, engine=engine, tracker=tracker, validation=validation,
                        exports=exports, first_step=state.step, bar=console if config["progress"] else None,
                        baseline=config.get("unigram_baseline"))
    throughput = Throughput(world, state.step, steps)
    runner = StepRunner(job, engine, model, world, PreemptionWatch(rank), throughput)
    batches = iter(stream)
    for step in range(state.step, steps):
        for hook in hooks:
            hook.before_step(step)
        done = runner.run(next(batches), step + 1)
        state.advance(done.step, done.loss, epoch=done.epoch, next_sample=done.next_sample, interruption=done.event)
        for hook in hooks:
            hook.after_step(done, state)

    # The end (also reached at once by a relaunch of a finished run): hash, export, last checkpoint.
    full = full_state_dict(model)  # a collective under expert parallelism
    end = RunEnd(state, full, {"step": state.step, "losses": state.losses, "restarts": state.restarts,
                               "interruptions": state.interruptions, "val_losses": state.val_losses,
                               **latest_val(state, validation is not None), "params_sha256": params_sha256(full),
                               "tokens_per_s": throughput.steady()})
    for hook in hooks:
        hook.at_end(end)
    tracker.finish()
