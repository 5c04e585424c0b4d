"""Hugging Face exports while a run trains (the ``export`` section).

Every ``export.every_n_checkpoints``-th checkpoint is exported by a Ray task (``dlmoe.export.checkpoint``) once
every rank's files are in storage, to ``{export.uri}-step-{N:08d}``; the training steps do not wait for it. The
task asks for no CPU of its own — a worker group may hold every CPU of the cluster — so it shares the node's cores.
At the end rank 0 writes the final model, from the weights it gathered, to ``export.uri`` (``at_end``). With
``export.register`` each export becomes a version of that MLflow registered model; ``models:/NAME/latest`` (MLflow's
reserved name for the highest version) is then the newest export.

An export that fails never fails training: it is reported — a warning in the worker's log, the metric
``export_failed_step`` and the artifact ``exports/failed-step-N.txt`` in the MLflow run — and the next checkpoint is
exported whatever ``every_n_checkpoints`` says. A successful one logs the metric ``export_step``.
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import torch

from data_pipeline import storage
from dlmoe.checkpointing import find_checkpoints, run_folder
from dlmoe.config import JobConfig, job_from_dict
from dlmoe.errors import ExportError
from dlmoe.export import model_from_state, save_pretrained
from dlmoe.export.checkpoint import DTYPES, export_checkpoint
from dlmoe.export.writer import write_to_uri
from dlmoe.tracking import Tracker, register_model_version, tracking_uri
from dlmoe.train.step import job_tokenizer


def export_uri(job: JobConfig, step: int | None = None) -> str:
    """Where the final model (``step`` None) or the export of the checkpoint at ``step`` goes."""
    base = job.export.uri or run_folder(job).child("hf").uri
    return base if step is None else f"{base.rstrip('/')}-step-{step:08d}"


def register(job: JobConfig, uri: str, step: int, run_id: str | None) -> str | None:
    """Register an export in the MLflow model registry when the job asks for it; returns the version."""
    if not job.export.register:
        return None
    return register_model_version(tracking_uri(job), job.export.register, uri, run_id=run_id,
                                  tags={"dlmoe.run_name": job.run_name, "dlmoe.step": str(step)})


def export_checkpoint_task(job_dict: dict[str, Any], step: int, run_id: str | None) -> dict[str, Any]:
    """The Ray task: export the run's checkpoint of ``step`` and register it."""
    job = job_from_dict(job_dict)
    run = run_folder(job)
    folders = [found.location.uri for found in find_checkpoints(run) if found.step == step]
    if not folders:
        raise ExportError(f"run {run.uri} has no checkpoint of step {step}")
    result = export_checkpoint(folders[0], export_uri(job, step), dtype=job.export.dtype or None,
                               endpoint_url=job.endpoint_url)
    return {"uri": result.uri, "step": step, "version": register(job, result.uri, step, run_id)}


class CheckpointExports:
    """Rank 0's bookkeeping of the export tasks of a run."""

    def __init__(self, job: JobConfig, tracker: Tracker, run_id: str | None) -> None:
        self.job, self.tracker, self.run_id = job, tracker, run_id
        self.checkpoints = 0
        self.retry = False
        self.pending: dict[Any, int] = {}  # task → step

    def after_checkpoint(self, step: int) -> None:
        """Called once every rank's files of the checkpoint at ``step`` are in storage."""
        import ray

        self.checkpoints += 1
        every = self.job.export.every_n_checkpoints
        if not every or not (self.retry or self.checkpoints % every == 0):
            return
        self.retry = False
        task = ray.remote(num_cpus=0, max_retries=0)(export_checkpoint_task)
        self.pending[task.remote(self.job.to_dict(), step, self.run_id)] = step

    def poll(self, wait: bool = False) -> None:
        """Report the tasks that have ended (all of them, waiting, with ``wait``)."""
        import ray

        if not self.pending:
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending) if wait else 1, timeout=None if wait
                           else 0)
        for task in done:
            step = self.pending.pop(task)
            try:
                result = ray.get(task)
            except Exception as exc:  # reported below and retried at the next checkpoint: exports never stop training
                self.failed(step, exc)
            else:
                version = {"export_registered_version": float(result["version"])} if result["version"] else {}
                self.tracker.log_metrics({"export_step": step, **version}, step)

    def failed(self, step: int, exc: BaseException) -> None:
        self.retry = True
        warnings.warn(f"the export of step {step} failed (training goes on; the next checkpoint will be exported): "
                      f"{exc}", stacklevel=2)
        self.tracker.log_metrics({"export_failed_step": step}, step)
        self.tracker.log_artifact(f"exports/failed-step-{step:08d}.txt",
                                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def export_final(job: JobConfig, full: dict[str, torch.Tensor], step: int, run_id: str | None) -> str:
    """Write the final model (the gathered weights) as a Hugging Face folder to ``export_uri(job)``, register it
    when asked, and return the folder's URI."""
    model_config = job.model.to_model_config()
    model = model_from_state(model_config, {k: v.to("cpu") for k, v in full.items()})
    target = storage.resolve(export_uri(job), endpoint_url=job.endpoint_url)
    tokenizer, dtype = job_tokenizer(job, model_config), DTYPES.get(job.export.dtype)
    write_to_uri(target, lambda out: save_pretrained(model, out, tokenizer=tokenizer, flavor=job.model.flavor,
                                                     step=step, source_run=job.run_name, dtype=dtype,
                                                     training=job.objective.recipe()))
    register(job, target.uri, step, run_id)
    return str(target.uri)
