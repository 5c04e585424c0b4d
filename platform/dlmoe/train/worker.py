"""The per-worker training function run by Ray Train on every rank (DESIGN.md habit 3): config → stream →
model → engine → steps. Everything it assembles is a component with its own tests.

Each rank reads its slice of every global batch from ``TokenStream`` (the masking noise of a row is a pure function
of (seed, epoch, global sample index), so one worker and many train on the same batches with the same noise), builds
the model from the same seed, and hands it to the parallelize step. Every ``checkpoint.every_steps`` (and at the end)
all ranks save their DeepSpeed files plus ``dlmoe_state.json`` (step, samples consumed, epoch, the losses so far,
restarts, config hash) and a ``checksums.json`` into one Ray Train checkpoint. A restarted worker group (a failure
under ``train.max_failures``, or a relaunch of the same run name) loads the latest checkpoint — weights, optimizer,
schedule, data position — and carries on. A preemption notice from Ray or a SIGTERM adds a checkpoint at the next
step boundary (``preemption.py``). The fault-injection section (tests only) kills or signals one rank once.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash

STATE_FILE = "dlmoe_state.json"
FAULT_MARK = "fault_injected"
CHECKSUM_FILE = "checksums.json"
TAG = "dlmoe"


def job_tokenizer(job: Any, config: Any) -> Any:
    """The job's tokenizer (``data.tokenizer``: ``byte`` or a tokenizer.json path) with the model's special ids."""
    from data_pipeline.tokenizers import byte_tokenizer, load_tokenizer

    if job.data.tokenizer == "byte":
        return byte_tokenizer()
    return load_tokenizer(job.data.tokenizer, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                          mask_id=config.mask_token_id)


def checkpoint_shape(job: Any) -> dict[str, Any]:
    """The settings a checkpoint cannot outlive: model geometry, expert and data parallel layout, batch, data."""
    return {"model": job.model.to_model_config().to_json_dict(), "mask_token_id": job.model.mask_token_id,
            "parallel.num_workers": job.parallel.num_workers, "parallel.ep_size": job.parallel.ep_size,
            "parallel.zero_stage": job.parallel.zero_stage, "data.global_batch_size": job.data.global_batch_size,
            "data.seq_len": job.data.seq_len, "data.seed": job.data.seed, "data.uri": job.data.uri,
            "data.tokenizer": job.data.tokenizer, "objective.kind": job.objective.kind}


def objective_settings(job: Any) -> Any:
    """The masked-diffusion objective's settings for ``job`` (noise, SFT, balance-loss coefficients)."""
    from dlmoe.diffusion import ObjectiveSettings

    balance = job.objective.balance
    return ObjectiveSettings(
        mask_token_id=job.model.mask_token_id, seed=job.data.seed, global_batch_size=job.data.global_batch_size,
        sft=job.objective.kind == "sft", eps=job.objective.eps,
        variable_length_prob=job.objective.variable_length_prob, stratified_t=job.objective.stratified_t,
        aux_loss_coef=balance.aux_loss_coef if balance.mode == "aux_loss" else 0.0,
        z_loss_coef=balance.z_loss_coef if balance.mode != "none" else 0.0,
        global_balance_counts=balance.global_counts)


def shape_changes(job: Any, state: dict[str, Any]) -> list[str]:
    """The checkpoint-bound settings of ``job`` that differ from those a checkpoint's state was made with."""
    return sorted(k for k, v in checkpoint_shape(job).items() if state.get("shape", {}).get(k) != v)


CHECKSUM_ALGORITHM = "xxh3_128"
HASHERS: dict[str, Any] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_checksum(path: Path, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """``algorithm:hex`` of a checkpoint file, hashed memory-mapped in one call. The lists use xxHash3-128 — a check
    against corrupt or changed files, not a signature — many times faster than sha256."""
    new = HASHERS[algorithm]
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return f"{algorithm}:{new().hexdigest()}"
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return f"{algorithm}:{new(view).hexdigest()}"


def checksum_matches(path: Path, recorded: str) -> bool:
    """Whether ``path`` exists and has the checksum a list recorded for it: ``algorithm:hex``, or a bare sha256 hex
    digest (the lists written before xxHash3)."""
    from dlmoe.errors import CheckpointError

    algorithm, _, digest = recorded.rpartition(":")
    algorithm = algorithm or "sha256"
    if algorithm not in HASHERS:
        raise CheckpointError(f"the checksum of {path} is recorded as {algorithm}, which this dlmoe does not know "
                              f"({', '.join(HASHERS)})")
    return path.is_file() and file_checksum(path, algorithm) == f"{algorithm}:{digest}"


def _checksums(folder: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKSUM_FILE:
            sums[str(path.relative_to(folder))] = file_checksum(path)
    return sums


def _save(engine: Any, state: dict[str, Any], rank: int) -> Any:
    """Save this rank's part of a checkpoint in a fresh local folder and return it as a Ray Train checkpoint."""
    from ray.train import Checkpoint

    folder = Path(tempfile.mkdtemp(prefix="dlmoe-ckpt-"))
    engine.save_checkpoint(str(folder), tag=TAG)
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    sums = _checksums(folder)
    (folder / f"{CHECKSUM_FILE}.rank{rank}").write_text(json.dumps(sums, indent=1))
    return Checkpoint.from_directory(str(folder))


def _load(engine: Any, checkpoint: Any) -> dict[str, Any]:
    """Restore weights, optimizer and schedule from a Ray Train checkpoint; return its ``dlmoe_state.json``."""
    from dlmoe.errors import CheckpointError

    with checkpoint.as_directory() as directory:
        folder = Path(directory)
        if not (folder / STATE_FILE).is_file():
            raise CheckpointError(f"checkpoint {checkpoint.path} has no {STATE_FILE}")
        for sums_file in sorted(folder.glob(f"{CHECKSUM_FILE}.rank*")):
            for name, digest in json.loads(sums_file.read_text()).items():
                if not checksum_matches(folder / name, digest):
                    raise CheckpointError(f"checkpoint {checkpoint.path}: {name} is missing or does not match "
                                          f"{sums_file.name}")
        state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
        load_path, _ = engine.load_checkpoint(str(folder), tag=TAG)
        if load_path is None:
            raise CheckpointError(f"checkpoint {checkpoint.path} holds no DeepSpeed state under tag '{TAG}'")
    return state


def run_checkpoint_states(run: Any) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, folder, ``dlmoe_state.json``) of every checkpoint in the run's storage folder, newest first."""
    from data_pipeline import storage

    if not storage.exists(run):
        return []
    found = []
    for state_file, _ in storage.list_files(run, (STATE_FILE,)):
        folder = state_file.path.rsplit("/", 1)[0]
        if folder.rsplit("/", 1)[-1].startswith("checkpoint_"):
            state = json.loads(storage.read_bytes(state_file))
            found.append((int(state.get("step", -1)), folder, state))
    return sorted(found, key=lambda f: (f[0], f[1]), reverse=True)


def _resume(engine: Any, run: Any) -> dict[str, Any] | None:
    """Load the newest checkpoint in the run's folder that verifies; a broken one is skipped with a warning.

    Ray Train keeps its checkpoints in that folder too; scanning it rather than asking ``ray.train.get_checkpoint``
    also finds a checkpoint Ray had not registered when a worker died just after reporting it, and those of an
    earlier launch of the same run name.
    """
    from ray.train import Checkpoint

    from dlmoe.errors import CheckpointError

    for _, folder, _ in run_checkpoint_states(run):
        try:
            return _load(engine, Checkpoint(path=folder, filesystem=run.fs))
        except CheckpointError as exc:
            warnings.warn(f"skipping a checkpoint that does not verify: {exc}", stacklevel=2)
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every rank. ``config``: ``job`` (the resolved job as a dict), ``dataset``
    (a tokenized dataset URI), ``use_gpu``, ``threads`` (torch threads of a CPU worker), ``mlflow_run_id``,
    ``progress``."""
    import ray.train

    from data_pipeline import storage
    from data_pipeline.stream import TokenStream
    from dlmoe.config import job_from_dict
    from dlmoe.diffusion import MaskedDiffusionObjective
    from dlmoe.errors import ConfigError, WorkerPreempted
    from dlmoe.model import build_model
    from dlmoe.model.balance import AuxFreeBalancer
    from dlmoe.monitor.metrics import ExpertLoadMonitor
    from dlmoe.parallel import full_state_dict, parallelize, params_sha256
    from dlmoe.tracking import make_tracker
    from dlmoe.train.exports import CheckpointExports, export_final
    from dlmoe.train.preemption import PreemptionWatch
    from dlmoe.train.validation import Validation

    job = job_from_dict(config["job"])
    if not config["use_gpu"]:
        torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model_config = job.model.to_model_config()
    tokenizer = job_tokenizer(job, model_config)
    torch.manual_seed(job.train.seed)
    model = build_model(model_config, seed=job.train.seed)
    run = storage.resolve(job.checkpoint.storage, endpoint_url=job.data.endpoint_url or None).child(job.run_name)
    if job.model.init_from and not run_checkpoint_states(run):  # a run that has checkpoints resumes from them
        _init_from(model, job.model.init_from, job.data.endpoint_url or None)
    model.activation_checkpointing = job.train.activation_checkpointing
    engine = parallelize(model, job, use_gpu=config["use_gpu"])

    state: dict[str, Any] = {"step": 0, "epoch": 0, "sample_in_epoch": 0, "losses": [], "restarts": 0,
                             "checkpoints": [], "interruptions": [], "val_losses": [], "shape": checkpoint_shape(job),
                             "config_hash": job.config_hash(), "run_name": job.run_name,
                             "flavor": job.model.flavor}
    resumed = _resume(engine, run)
    if resumed is not None:
        changed = shape_changes(job, resumed)
        if changed:
            raise ConfigError(f"run '{job.run_name}' cannot resume: its checkpoint was made with other "
                              f"{', '.join(changed)}; keep them or use a new run_name", key="run_name")
        state = {"interruptions": [], "val_losses": [], **resumed, "restarts": resumed["restarts"] + 1,
                 "config_hash": job.config_hash()}

    gbs, steps = job.data.global_batch_size, job.train.steps
    stream = TokenStream(config["dataset"], global_batch_size=gbs, seed=job.data.seed, rank=rank, world_size=world,
                         start_sample=state["sample_in_epoch"], epoch=state["epoch"], seq_len=job.data.seq_len,
                         tokenizer_fingerprint=tokenizer.fingerprint, kind=job.objective.kind,
                         endpoint_url=job.data.endpoint_url or None)
    balance = job.objective.balance
    objective = MaskedDiffusionObjective(objective_settings(job))

    balancer = AuxFreeBalancer(model, balance.bias_update_rate) if balance.mode == "aux_free" else None
    tracker = make_tracker(job, rank, config.get("mlflow_run_id"))
    monitor = ExpertLoadMonitor(job.monitor.dead_fraction, tracker)
    micro = job.micro_batch_per_worker
    watch = PreemptionWatch(rank)
    validation = Validation(job, rank, world, tokenizer.fingerprint) if job.train.eval_every else None
    exports = CheckpointExports(job, tracker, config.get("mlflow_run_id")) if rank == 0 and job.export.enabled \
        else None
    exports_of_checkpoints = job.export.enabled and job.export.every_n_checkpoints > 0
    batches = iter(stream)
    progress = _progress(rank, steps, state["step"], job.run_name) if config.get("progress", True) else None
    started, tokens = time.perf_counter(), 0
    # Steady-state throughput: over the second half of this launch's steps. The first ones pay for allocation and
    # warm-up, and for Ray's own actors (controller, watchers) still starting on the same cores.
    measure_from = state["step"] + max(1, (steps - state["step"]) // 2)
    warm_time, warm_tokens = started, 0
    for step in range(state["step"], steps):
        fault = job.fault_injection
        if fault.enabled and rank == fault.rank and step == fault.step and not storage.exists(run.child(FAULT_MARK)):
            _inject_fault(fault.kind, run.child(FAULT_MARK), rank, step)
        batch = next(batches)
        losses, counts_RLE, seen = train_step(engine, objective, batch, micro, job.accumulation_steps,
                                              job.monitor.mask_buckets)
        tokens += seen
        # loss, balance loss, z-loss (averaged over micro-batches), then the preemption flags (summed over ranks)
        parts = torch.cat([losses, watch.flags().to(losses.device)])
        if balancer is not None and counts_RLE is not None:
            balancer.update(counts_RLE.sum(0))  # this rank's counts: the balancer sums them over the ranks itself
        if dist.is_initialized() and world > 1:
            dist.all_reduce(parts)
            parts[:3] /= world
            if counts_RLE is not None:
                dist.all_reduce(counts_RLE)
        if counts_RLE is not None:
            monitor.add(counts_RLE, step + 1)
        event = watch.event(parts[3:])
        loss = float(parts[0])
        rate = tokens * world / (time.perf_counter() - started)
        if step + 1 == measure_from:
            warm_time, warm_tokens = time.perf_counter(), tokens
        if (step + 1) % job.train.log_every == 0 or step + 1 == steps:
            grad_norm = engine.get_global_grad_norm()
            metrics_now = {"loss": loss, "lr": float(engine.get_lr()[0]), "tokens_per_s": rate,
                           "balance_loss": float(parts[1]), "z_loss": float(parts[2]),
                           **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                           **monitor.take_scalars()}
            tracker.log_metrics(metrics_now, step + 1)
        if (step + 1) % job.monitor.expert_load_every == 0 or step + 1 == steps:
            monitor.log_artifact()
        state["losses"].append(loss)
        if validation is not None and ((step + 1) % job.train.eval_every == 0 or step + 1 == steps):
            val_loss = validation.evaluate(engine)  # every rank: a collective under expert parallelism
            state["val_losses"].append([step + 1, val_loss])
            tracker.log_metrics({"val_loss": val_loss}, step + 1)
        state["step"] = step + 1
        state["epoch"] = int(batch["epoch"])
        state["sample_in_epoch"] = (int(batch["sample_index"][0]) // gbs + 1) * gbs
        if exports is not None:
            exports.poll()
        if progress is not None:
            progress.update(1)
            val = f" val {state['val_losses'][-1][1]:.3f}" if state["val_losses"] else ""
            progress.set_description(f"train {job.run_name} step {step + 1} loss {loss:.3f}{val} {rate:.0f} tok/s")
        if event is not None:
            state["interruptions"].append({"step": step + 1, "cause": event})
        if step + 1 < steps and (event is not None or (step + 1) % job.checkpoint.every_steps == 0):
            state["checkpoints"].append(step + 1)
            scores = _latest_val(state, validation is not None)
            ray.train.report({"step": step + 1, "loss": loss, "lr": engine.get_lr()[0], **scores},
                             checkpoint=_save(engine, state, rank))
            tracker.log_metrics({"checkpoint_step": step + 1}, step + 1)  # what the operator shows as the latest
            if exports_of_checkpoints and world > 1:
                dist.barrier()  # every rank's files of the checkpoint are in storage before it is exported
            if exports is not None:
                exports.after_checkpoint(step + 1)
            if event == "sigterm":
                raise WorkerPreempted(f"rank {rank} of run '{job.run_name}': a worker got SIGTERM; stopped after "
                                      f"saving the checkpoint of step {step + 1}")
    if progress is not None:
        progress.close()

    # The end (also reached at once by a relaunch of a finished run): hash, export, last checkpoint.
    full = full_state_dict(model)  # a collective under expert parallelism
    elapsed = time.perf_counter() - warm_time
    metrics: dict[str, Any] = {"step": state["step"], "losses": state["losses"], "restarts": state["restarts"],
                               "interruptions": state.get("interruptions", []), "val_losses": state["val_losses"],
                               **_latest_val(state, validation is not None),
                               "params_sha256": params_sha256(full),
                               "tokens_per_s": (tokens - warm_tokens) * world / elapsed if elapsed > 0 else 0.0}
    if exports is not None:
        exports.poll(wait=True)
        if job.export.at_end:
            try:
                metrics["export"] = export_final(job, model_config, tokenizer, full, state["step"],
                                                 config.get("mlflow_run_id"))
            except Exception as exc:  # reported by failed(): an export never fails the training it comes from
                exports.failed(state["step"], exc)
    if not state["checkpoints"] or state["checkpoints"][-1] != state["step"]:
        state["checkpoints"].append(state["step"])
    metrics["checkpoints"] = list(state["checkpoints"])
    ray.train.report(metrics, checkpoint=_save(engine, state, rank))
    tracker.log_metrics({"checkpoint_step": state["step"]}, state["step"])
    tracker.finish()


def micro_batches(batch: dict[str, Any], micro: int, device: torch.device | str
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """A batch from ``TokenStream`` in micro-batches of ``micro`` rows: token ids (on ``device``), global sample
    indices and, for SFT data, prompt lengths."""
    prompt_len = batch.get("prompt_len")
    for lo in range(0, len(batch["input_ids"]), micro):
        part = slice(lo, lo + micro)
        yield (torch.from_numpy(batch["input_ids"][part]).to(device), torch.from_numpy(batch["sample_index"][part]),
               None if prompt_len is None else torch.from_numpy(prompt_len[part]))


def _latest_val(state: dict[str, Any], validating: bool) -> dict[str, float]:
    """The newest validation loss for a checkpoint's metrics (what ``checkpoint.score_attribute=val_loss`` ranks);
    NaN, which Ray ranks last, before the first validation. Nothing when the job has no validation set."""
    if not validating:
        return {}
    return {"val_loss": float(state["val_losses"][-1][1]) if state["val_losses"] else math.nan}


def train_step(engine: Any, objective: Any, batch: dict[str, Any], micro: int, accumulation_steps: int,
               mask_bins: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One optimizer step on this rank's share of a global batch, in micro-batches of ``micro`` (the engine steps
    the optimizer at the accumulation boundary). Returns the loss, balance loss and z-loss averaged over the
    micro-batches, the token counts [mask-ratio bins, layers, experts] (``None`` for a model without MoE layers),
    both on the engine's device, and the number of tokens trained on."""
    from dlmoe.monitor.metrics import bucket_counts

    device = engine.device
    losses = torch.zeros(3, dtype=torch.float64, device=device)
    counts_RLE: torch.Tensor | None = None
    tokens = 0
    for input_ids, sample_index, prompt_len in micro_batches(batch, micro, device):
        out = objective(engine, input_ids, sample_index, batch["epoch"], prompt_len_B=prompt_len)
        engine.backward(out.loss)
        engine.step()
        losses += torch.stack([out.loss.detach(), out.balance_loss, out.z_loss]).to(torch.float64) / accumulation_steps
        if out.router_stats:
            counts = bucket_counts(out.router_stats, out.t_B, mask_bins)
            counts_RLE = counts if counts_RLE is None else counts_RLE + counts
        tokens += out.seq_len * micro
    return losses, counts_RLE, tokens


def _init_from(model: Any, uri: str, endpoint_url: str | None) -> None:
    """Load a release-format folder's weights into the freshly built (whole, not yet expert-parallel) model; the
    parallelize step then gives each rank its experts, whatever the expert-parallel size."""
    from dlmoe.export.hf import read_state
    from dlmoe.export.remote import local_folder

    with local_folder(uri, endpoint_url) as folder:
        state = read_state(folder, model.config)
    with torch.no_grad():
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)


def _inject_fault(kind: str, mark: Any, rank: int, step: int) -> None:
    """Test-only: stop this worker as a failure would. ``kill`` is a hard crash, as a killed pod: no cleanup, no last
    checkpoint. ``sigterm`` signals this process, then waits until the handler has seen it (Python runs it on the
    main thread, the next time Ray gives that thread work) so the step it takes effect at is known."""
    from data_pipeline import storage
    from dlmoe.errors import DlmoeError
    from dlmoe.train.preemption import sigterm_received

    storage.write_bytes(mark, f"rank {rank} given {kind} at step {step}\n".encode())
    if kind == "kill":
        os._exit(17)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not sigterm_received():
        if time.monotonic() > deadline:
            raise DlmoeError(f"rank {rank}: the SIGTERM handler did not run within 60 s")
        time.sleep(0.01)


def _progress(rank: int, total: int, initial: int, run_name: str) -> Any:
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=total - initial, desc=f"train {run_name} from step {initial}")
