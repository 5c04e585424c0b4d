"""``dlmoe train``: a Ray Train ``TorchTrainer`` built from the job config, on the cluster in force or a local one.

Inside ``ray job submit`` or a KubeRay pod, ``ray.init()`` joins that cluster (``RAY_ADDRESS``); elsewhere it
starts a local one. With ``data.uri`` empty the default corpus (the standard library's sources, byte-level) is
tokenized once into ``{checkpoint.storage}/data/`` and streamed like any dataset. The run lives under
``{checkpoint.storage}/{run_name}/``: Ray Train keeps the last ``checkpoint.num_to_keep`` checkpoints there, a
failed worker group is restarted from the latest one up to ``train.max_failures`` times, and launching the same
run name again resumes it. The driver opens (or finds again) the run's MLflow run, into which rank 0 logs. Rank 0
exports the final model to ``{checkpoint.storage}/{run_name}/hf``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import ray_jobs, storage
from dlmoe import checkpointing
from dlmoe.config import HELDOUT, JobConfig, job_from_dict
from dlmoe.errors import ConfigError, DataError, DlmoeError, ExportError
from dlmoe.tracking import open_run, tracking_uri
from dlmoe.train.step import job_tokenizer

DEFAULT_CORPUS_HELDOUT = 0.1  # the share of the default corpus's documents held out (data.validation=heldout)
BASELINE_MAX_TOKENS = 2**28  # the unigram baseline is counted for training sets up to this size


@dataclass
class TrainingResult:
    """What ``--summary-json`` writes."""

    run_name: str
    final_step: int
    losses: list[float] = field(default_factory=list)
    params_sha256: str = ""
    restarts: int = 0
    checkpoints: list[str] = field(default_factory=list)
    interruptions: list[dict[str, Any]] = field(default_factory=list)  # {step, cause}: a checkpoint on preemption
    val_losses: list[list[float]] = field(default_factory=list)  # [step, validation loss]
    export: str = ""
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    tokens_per_second: float = 0.0
    best_checkpoint: str = ""  # by checkpoint.score_attribute, when set
    best_score: float | None = None
    unigram_baseline: float | None = None  # held-out unigram cross-entropy (nats/token), with a validation set

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"


def prepare_dataset(job: JobConfig, *, progress: bool) -> str:
    """The dataset URI to stream: ``data.uri``, or the default corpus tokenized once under the storage. A
    ``data.validation`` dataset is checked against the job too."""
    uri = _training_dataset(job, progress=progress)
    if job.data.validation == HELDOUT:
        from data_pipeline.shards import MANIFEST_FILE

        held = storage.resolve(job.validation_uri, endpoint_url=job.endpoint_url)
        if not storage.exists(held.child(MANIFEST_FILE)):
            raise DataError(f"the dataset {job.data.uri} has no held-out set at {held.uri} (data.validation="
                            f"heldout): tokenize it with dlmoe tokenize --validation-fraction F")
    if job.data.validation:
        _check_dataset(job, job.validation_uri)
    return uri


def unigram_baseline(job: JobConfig) -> float | None:
    """The held-out unigram cross-entropy (nats/token) of the job's training and validation sets — the loss of a
    model that ignores context, the first baseline a trained one must beat — when the job has a validation set and
    the training set is small enough to count here (``BASELINE_MAX_TOKENS``); else ``None``."""
    from data_pipeline.baselines import heldout_unigram_cross_entropy
    from data_pipeline.shards import read_manifest

    if not job.data.validation:
        return None
    if read_manifest(job.dataset_uri, endpoint_url=job.endpoint_url).tokens > BASELINE_MAX_TOKENS:
        return None
    return heldout_unigram_cross_entropy(job.dataset_uri, job.validation_uri, endpoint_url=job.endpoint_url)


def _training_dataset(job: JobConfig, *, progress: bool) -> str:
    from data_pipeline.tokenize import TokenizeSpec, run_tokenize

    if job.data.uri:
        _check_dataset(job, job.data.uri)
        return job.data.uri
    if job.data.tokenizer != "byte" or job.objective.kind != "pretrain":
        raise ConfigError("the default corpus is byte-level pretraining text; SFT or another tokenizer needs a "
                          "tokenized dataset in data.uri (dlmoe tokenize)", key="data.uri")
    # Ours to keep: a copy made by an older dlmoe (another split) is made again rather than refused.
    run_tokenize(TokenizeSpec(output=job.dataset_uri, seq_len=job.data.seq_len, endpoint_url=job.endpoint_url,
                              validation_fraction=DEFAULT_CORPUS_HELDOUT, overwrite=True), progress=progress)
    return job.dataset_uri


def _check_dataset(job: JobConfig, uri: str) -> None:
    """Fail here, before any worker starts, when a dataset does not fit the job."""
    from data_pipeline.shards import check_against_job, check_sizes, read_manifest

    manifest = read_manifest(uri, endpoint_url=job.endpoint_url)
    tokenizer = job_tokenizer(job, job.model.to_model_config())
    check_against_job(manifest, uri, seq_len=job.data.seq_len, tokenizer_fingerprint=tokenizer.fingerprint,
                      kind=job.objective.kind)
    check_sizes(manifest, uri, endpoint_url=job.endpoint_url)
    mask_id = manifest.tokenizer.get("mask_id")
    if mask_id != job.model.mask_token_id:
        raise ConfigError(f"the dataset {uri} masks with id {mask_id}, the model with {job.model.mask_token_id}",
                          key="model.mask_token_id")


def _with_absolute_paths(job: JobConfig) -> JobConfig:
    """A copy of ``job`` whose local storage, data and tokenizer paths are absolute: Ray workers run elsewhere."""
    absolute = job_from_dict(job.to_dict())
    for section, key in (("checkpoint", "storage"), ("data", "uri"), ("data", "validation"), ("model", "init_from")):
        value = getattr(getattr(absolute, section), key)
        if value and "://" not in value and (section, key, value) != ("data", "validation", HELDOUT):
            setattr(getattr(absolute, section), key, storage.resolve(value).path)
    if absolute.data.tokenizer != "byte" and "://" not in absolute.data.tokenizer:
        absolute.data.tokenizer = str(Path(absolute.data.tokenizer).expanduser().resolve())
    absolute.tracking.uri = tracking_uri(job)
    return absolute


def check_init_from(job: JobConfig) -> None:
    """Refuse, before any worker starts, a ``model.init_from`` folder whose model is not the job's."""
    from dlmoe.export.remote import config_differences, folder_config

    if not job.model.init_from:
        return
    try:
        found = folder_config(job.model.init_from, job.endpoint_url)
    except (ExportError, ConfigError) as exc:
        raise ConfigError(f"cannot start from {job.model.init_from}: {exc}", key="model.init_from") from exc
    differences = config_differences(job.model.to_model_config(), found)
    if differences:
        raise ConfigError(f"{job.model.init_from} holds another model than the job's: {'; '.join(differences)}",
                          key="model.init_from")


def check_resumable(job: JobConfig) -> None:
    """Refuse, before any worker starts, to resume a run whose newest checkpoint the job's settings would break."""
    run = checkpointing.run_folder(job)
    found = checkpointing.find_checkpoints(run)
    if found:
        checkpointing.check_resumable(job, found[0].state, run.uri)


def run_training(job: JobConfig, *, progress: bool = True, verbose: bool = False) -> TrainingResult:
    """Train ``job`` with Ray Train, holding the run's lock; returns the summary of the finished run. The console
    shows one progress bar and dlmoe's warnings; ``verbose`` lets Ray's, DeepSpeed's and MLflow's output through."""
    lock = checkpointing.RunLock(job)
    lock.acquire()
    try:
        return _train(job, progress=progress, verbose=verbose)
    finally:
        lock.release()


def _train(job: JobConfig, *, progress: bool, verbose: bool) -> TrainingResult:
    import ray
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.exceptions import TrainingFailedError

    from dlmoe.tracking import fail_run
    from dlmoe.train.console import DriverConsole
    from dlmoe.train.failures import DlmoeTrainer, failure_message
    from dlmoe.train.preemption import TorchWithSigterm
    from dlmoe.train.worker import train_loop_per_worker

    if not verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's INFO lines ("Creating initial ...")
    if not ray.is_initialized():
        ray.init(address=ray_jobs.ray_address(), include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=verbose)
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    if job.parallel.use_gpu and gpus < job.parallel.num_workers:
        raise ConfigError(f"{job.parallel.num_workers} GPU workers requested, the Ray cluster has {gpus:g} GPUs",
                          key="parallel.use_gpu")
    job = _with_absolute_paths(job)
    check_init_from(job)
    dataset = prepare_dataset(job, progress=progress)
    baseline = unigram_baseline(job)
    where = storage.resolve(job.checkpoint.storage, endpoint_url=job.endpoint_url)
    check_resumable(job)
    if not where.is_s3:
        Path(where.path).mkdir(parents=True, exist_ok=True)
    # A CPU worker takes its share of the cluster's CPUs and runs that many torch threads (Ray would otherwise
    # pin it to one thread through OMP_NUM_THREADS).
    share = cpus / job.parallel.num_workers
    per_worker = {} if job.parallel.use_gpu else {"CPU": share}
    threads = max(1, int(share))
    mlflow_run_id = open_run(job) if job.tracking.enabled else None
    console = DriverConsole(progress=progress)
    trainer = DlmoeTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "dataset": dataset, "use_gpu": job.parallel.use_gpu,
                           "mlflow_run_id": mlflow_run_id, "progress": progress, "threads": threads,
                           "unigram_baseline": baseline, "console": console.handle, "verbose": verbose},
        torch_config=TorchWithSigterm(sigterm_grace_s=job.checkpoint.sigterm_grace_s),
        scaling_config=ScalingConfig(num_workers=job.parallel.num_workers, use_gpu=job.parallel.use_gpu,
                                     resources_per_worker=per_worker or None),
        run_config=RunConfig(name=job.run_name, storage_path=where.path, storage_filesystem=where.fs,
                             failure_config=FailureConfig(max_failures=job.train.max_failures),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=job.checkpoint.num_to_keep,
                                 checkpoint_score_attribute=job.checkpoint.score_attribute or None,
                                 checkpoint_score_order="max" if job.checkpoint.score_order == "max" else "min")),
    )
    with console:
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            message = failure_message(job.run_name, exc)
            if mlflow_run_id:
                fail_run(job, mlflow_run_id, message)
            raise DlmoeError(message) from exc
    metrics: dict[str, Any] = result.metrics or {}
    kept = getattr(result, "best_checkpoints", None) or []
    checkpoints = [str(c.path) for c, _ in kept]
    if result.checkpoint is not None and str(result.checkpoint.path) not in checkpoints:
        checkpoints.append(str(result.checkpoint.path))
    best = best_checkpoint(kept, job.checkpoint.score_attribute, job.checkpoint.score_order)
    return TrainingResult(run_name=job.run_name, final_step=int(metrics.get("step", 0)),
                          losses=list(metrics.get("losses", [])), params_sha256=str(metrics.get("params_sha256", "")),
                          restarts=int(metrics.get("restarts", 0)), checkpoints=checkpoints,
                          interruptions=list(metrics.get("interruptions", [])),
                          val_losses=list(metrics.get("val_losses", [])),
                          export=str(metrics.get("export", "")), mlflow_run_id=mlflow_run_id or "",
                          tracking_uri=job.tracking.uri if mlflow_run_id else "",
                          tokens_per_second=float(metrics.get("tokens_per_s", 0.0)),
                          best_checkpoint=best[0] if best else "", best_score=best[1] if best else None,
                          unigram_baseline=baseline)


def best_checkpoint(kept: list[tuple[Any, dict[str, Any]]], attribute: str, order: str) -> tuple[str, float] | None:
    """The path and score of the best kept checkpoint by ``attribute`` (None without one, or when no checkpoint
    has a finite score)."""
    scored = [(str(c.path), float(m[attribute])) for c, m in kept
              if attribute and isinstance(m.get(attribute), int | float) and math.isfinite(m[attribute])]
    if not scored:
        return None
    return (min if order == "min" else max)(scored, key=lambda item: item[1])


def show_sample(export_uri: str, prompt: str = "def ", gen_length: int = 48) -> str | None:
    """A short generation from an exported folder (local exports only), to show the model end to end: sampled at
    temperature 1, one token per forward pass from left to right, seed 0. (Greedy confidence decoding of a model as
    small as the default job's fills the answer with its likeliest byte, a space, which shows nothing it learned.)"""
    from data_pipeline.tokenizers import load_tokenizer
    from dlmoe.diffusion import GenerationSettings, generate
    from dlmoe.export import load_pretrained

    folder = Path(export_uri)
    if "://" in export_uri or not folder.is_dir():
        return None
    model = load_pretrained(folder)
    config = model.config
    tokenizer = load_tokenizer(folder, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                               mask_id=config.mask_token_id)
    settings = GenerationSettings(gen_length=gen_length, block_length=1, steps=gen_length, temperature=1.0, seed=0)
    result = generate(model, [tokenizer.encode(prompt)], settings, mask_id=config.mask_token_id,
                      eos_id=config.eos_token_id, pad_id=config.pad_token_id)
    return prompt + tokenizer.decode(result.answers[0])
