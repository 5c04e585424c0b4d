"""The training loop's side jobs, each a small component the loop calls at three known points (DESIGN.md habit 3):
``before_step`` (the 0-based index of the step about to run), ``after_step`` (the finished step's
``StepOutcome`` and the ``CheckpointState`` already advanced past it) and ``at_end`` (the ``RunEnd``: the gathered
weights and the final report the components add to). The loop calls them in the order ``build_hooks`` gives:

- ``FaultInjection`` (tests only): stops one rank once, as a crash or a SIGTERM would;
- ``MetricsLog``: the step's scalars to the tracker every ``train.log_every`` steps, the expert-load artifact every
  ``monitor.expert_load_every`` steps;
- ``ValidationRun``: the fixed-noise validation loss every ``train.eval_every`` steps (a collective);
- ``ProgressBar``: rank 0's progress line;
- ``ExportPoll``: rank 0's export tasks reported as they end; the final model exported at the end;
- ``Checkpointer``: a checkpoint every ``checkpoint.every_steps`` steps and on preemption, and the last one with
  the final report.
"""

from __future__ import annotations

import math
import os
import posixpath
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from data_pipeline import storage
from dlmoe import checkpointing
from dlmoe.checkpointing import CheckpointState
from dlmoe.config import JobConfig
from dlmoe.errors import CheckpointWriteError, DlmoeError, WorkerPreempted
from dlmoe.monitor.metrics import ExpertLoadMonitor
from dlmoe.tracking import Tracker
from dlmoe.train.console import WorkerConsole
from dlmoe.train.exports import CheckpointExports, export_final
from dlmoe.train.step import StepOutcome
from dlmoe.train.validation import Validation

FAULT_MARK = "fault_injected"
HANG_S = 300.0


@dataclass
class RunEnd:
    """What the components see at the end of a launch (also reached at once by a relaunch of a finished run)."""

    state: CheckpointState
    full: dict[str, torch.Tensor]  # the whole model, gathered on every rank
    metrics: dict[str, Any] = field(default_factory=dict)  # the final report to Ray Train


class Hook:
    """A component of the loop; every method is a no-op unless overridden."""

    def before_step(self, step: int) -> None:
        """Before the step of 0-based index ``step`` reads its batch."""

    def after_step(self, done: StepOutcome, state: CheckpointState) -> None:
        """After step ``done.step`` (1-based); ``state`` already counts it."""

    def at_end(self, end: RunEnd) -> None:
        """Once the last step is done and the weights are gathered."""


def latest_val(state: CheckpointState, validating: bool) -> dict[str, float]:
    """The newest validation loss for a checkpoint's metrics (what ``checkpoint.score_attribute=val_loss`` ranks);
    NaN, which Ray ranks last, before the first validation. Nothing when the job has no validation set."""
    if not validating:
        return {}
    return {"val_loss": float(state.val_losses[-1][1]) if state.val_losses else math.nan}


def _due(step: int, every: int, steps: int) -> bool:
    """Whether a side job done every ``every`` steps (and at the last one) is due after step ``step`` (1-based)."""
    return step % every == 0 or step == steps


class FaultInjection(Hook):
    """Test-only (``fault_injection``): stop rank ``fault_injection.rank`` once, at ``fault_injection.step``, as a
    failure would. A mark file in the run folder keeps a restarted worker group from being stopped again. ``kill`` is
    a hard crash, as a killed pod: no cleanup, no last checkpoint. ``sigterm`` signals this process, then waits until
    the handler has seen it (Python runs it on the main thread, the next time Ray gives that thread work) so the step
    it takes effect at is known. ``hang`` stops the rank for ``HANG_S`` (the run stands still while a test kills
    its driver)."""

    def __init__(self, job: JobConfig, rank: int, exit: Callable[[int], Any] = os._exit) -> None:
        self.fault, self.rank, self.exit = job.fault_injection, rank, exit
        self.mark = checkpointing.run_folder(job).child(FAULT_MARK)

    def before_step(self, step: int) -> None:
        fault = self.fault
        if not (fault.enabled and self.rank == fault.rank and step == fault.step) or storage.exists(self.mark):
            return
        storage.write_bytes(self.mark, f"rank {self.rank} given {fault.kind} at step {step}\n".encode())
        if fault.kind == "kill":
            self.exit(17)
            return
        if fault.kind == "hang":  # holds the run mid-step, for a test to kill the driver meanwhile
            time.sleep(HANG_S)
            return
        from dlmoe.train.preemption import sigterm_received

        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not sigterm_received():
            if time.monotonic() > deadline:
                raise DlmoeError(f"rank {self.rank}: the SIGTERM handler did not run within 60 s")
            time.sleep(0.01)


class MetricsLog(Hook):
    """Every rank's expert counts into the monitor's windows; rank 0's tracker gets the step's scalars (loss, lr,
    throughput, balance and z-loss, gradient norm, expert-load summary) every ``train.log_every`` steps and the
    expert-load artifact every ``monitor.expert_load_every`` steps, both at the last step too."""

    def __init__(self, job: JobConfig, engine: Any, tracker: Tracker) -> None:
        self.engine, self.tracker = engine, tracker
        self.steps, self.log_every = job.train.steps, job.train.log_every
        self.load_every = job.monitor.expert_load_every
        self.monitor = ExpertLoadMonitor(job.monitor.dead_fraction, tracker)
        self.block_diffusion = job.objective.block_schedule.enabled or job.objective.block_size > 0

    def block_metrics(self, done: StepOutcome) -> dict[str, float]:
        """The step's block size under block diffusion (0: full sequence), so the schedule shows in MLflow."""
        return {"block_size": done.block_size} if self.block_diffusion else {}

    def after_step(self, done: StepOutcome, state: CheckpointState) -> None:
        if done.counts_RLE is not None:
            self.monitor.add(done.counts_RLE, done.step)
        if _due(done.step, self.log_every, self.steps):
            grad_norm = self.engine.get_global_grad_norm()
            self.tracker.log_metrics({"loss": done.loss, "lr": float(self.engine.get_lr()[0]),
                                      "tokens_per_s": done.tokens_per_s, "balance_loss": done.balance_loss,
                                      "z_loss": done.z_loss, **self.block_metrics(done),
                                      **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                                      **self.monitor.take_scalars()}, done.step)
        if _due(done.step, self.load_every, self.steps):
            self.monitor.log_artifact()


class ValidationRun(Hook):
    """The validation loss every ``train.eval_every`` steps and at the last one, on every rank (a collective under
    expert parallelism), kept in the state and logged."""

    def __init__(self, job: JobConfig, validation: Validation, engine: Any, tracker: Tracker) -> None:
        self.validation, self.engine, self.tracker = validation, engine, tracker
        self.steps, self.every = job.train.steps, job.train.eval_every

    def after_step(self, done: StepOutcome, state: CheckpointState) -> None:
        if _due(done.step, self.every, self.steps):
            val_loss = self.validation.evaluate(self.engine)
            state.val_losses.append([done.step, val_loss])
            self.tracker.log_metrics({"val_loss": val_loss}, done.step)


class ExportPoll(Hook):
    """Rank 0's exports: the tasks of checkpoints reported as they end, and at the end — once every task has
    ended — the final model from the gathered weights (``export.at_end``). An export never fails training."""

    def __init__(self, job: JobConfig, exports: CheckpointExports, final: Callable[..., str] = export_final) -> None:
        self.job, self.exports, self.final = job, exports, final

    def after_step(self, done: StepOutcome, state: CheckpointState) -> None:
        self.exports.poll()

    def at_end(self, end: RunEnd) -> None:
        self.exports.poll(wait=True)
        if not self.job.export.at_end:
            return
        try:
            end.metrics["export"] = self.final(self.job, end.full, end.state.step, self.exports.run_id)
        except Exception as exc:  # reported by failed(): an export never fails the training it comes from
            self.exports.failed(end.state.step, exc)


class ProgressBar(Hook):
    """Rank 0's progress line: step, loss, validation loss (beside the held-out unigram baseline, when known),
    throughput; the driver draws it (``console.DriverConsole``)."""

    def __init__(self, job: JobConfig, first_step: int, console: WorkerConsole, baseline: float | None = None) -> None:
        self.run_name, self.baseline, self.console = job.run_name, baseline, console
        console.start_bar(job.train.steps - first_step, f"train {job.run_name} from step {first_step}")

    def after_step(self, done: StepOutcome, state: CheckpointState) -> None:
        self.console.step(self.describe(done, state))

    def describe(self, done: StepOutcome, state: CheckpointState) -> str:
        val = f" val {state.val_losses[-1][1]:.3f}" if state.val_losses else ""
        if val and self.baseline is not None:
            val += f" (unigram {self.baseline:.3f})"
        return f"train {self.run_name} step {done.step} loss {done.loss:.3f}{val} {done.tokens_per_s:.0f} tok/s"


def ray_report(metrics: dict[str, Any], checkpoint: storage.Location) -> None:
    """Report to Ray Train, with a checkpoint already written into the run folder (``checkpointing.write``)."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    ray.train.report(metrics, checkpoint=Checkpoint(path=checkpoint.path, filesystem=checkpoint.fs),
                     checkpoint_dir_name=posixpath.basename(checkpoint.path),
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def gather_from_ranks(world: int) -> Callable[[str], list[str]]:
    """Every rank's value of a string, in rank order (one rank: its own)."""
    def gather(value: str) -> list[str]:
        if world == 1:
            return [value]
        values: list[str] = [""] * world
        dist.all_gather_object(values, value)
        return values

    return gather


class Checkpointer(Hook):
    """Every rank's part of a checkpoint every ``checkpoint.every_steps`` steps and whenever a preemption notice
    or a SIGTERM arrives (then stopping with ``WorkerPreempted``), reported to Ray Train; the last checkpoint at the
    end, with the final report. Rank 0's exports of checkpoints start once every rank's files are in storage.

    A checkpoint that cannot be written is removed again and, by ``checkpoint.on_write_error``, stops the run
    (``CheckpointWriteError`` on every rank, naming the folder) or is reported (a warning and the metric
    ``checkpoint_failed_step``) while training goes on; either way the checkpoints before it stay as they were. The
    last checkpoint cannot be done without: a run ends only once its final weights are saved."""

    def __init__(self, job: JobConfig, engine: Any, rank: int, world: int, tracker: Tracker,
                 exports: CheckpointExports | None, validating: bool,
                 report: Callable[..., None] = ray_report, write: Callable[..., list[str]] = checkpointing.write,
                 gather: Callable[[str], list[str]] | None = None) -> None:
        self.job, self.engine, self.rank, self.tracker = job, engine, rank, tracker
        self.exports, self.validating, self.report, self.write = exports, validating, report, write
        self.gather = gather or gather_from_ranks(world)
        self.run = checkpointing.run_folder(job)

    def _checkpoint(self, state: CheckpointState, metrics: dict[str, Any], final: bool = False) -> bool:
        """Write the checkpoint of ``state.step`` and report it with ``metrics`` (``final``: the last one, with the
        list of checkpoints); whether it was written. When it was not, under ``on_write_error=continue`` and not
        ``final``, nothing is reported."""
        new = not state.checkpoints or state.checkpoints[-1] != state.step  # not a relaunch of a finished run
        if new:
            state.checkpoints.append(state.step)
        if final:
            metrics["checkpoints"] = list(state.checkpoints)
        target = self.run.child(self.gather(checkpointing.folder_name(state.step))[0])  # rank 0's name
        errors = [e for e in self.write(self.engine, state, self.rank, target, self.gather) if e]
        if not errors:
            self.report(metrics, checkpoint=target)
            self.tracker.log_metrics({"checkpoint_step": state.step}, state.step)  # the operator's latest
            return True
        if new:
            state.checkpoints.pop()
        message = f"the checkpoint of step {state.step} could not be written to {target.uri}: {'; '.join(errors)}"
        if self.rank == 0:
            try:
                storage.delete(target)
            except DlmoeError as exc:
                message += (f" (what was written of it stays, and is never resumed: it has no "
                            f"{checkpointing.STATE_FILE}; removing it failed: {exc})")
        before = (f"the checkpoint of step {state.checkpoints[-1]} is intact" if state.checkpoints
                  else "there is no earlier checkpoint")
        if final:  # the run's last state: a run whose weights were not saved has not ended
            raise CheckpointWriteError(f"{message}: the last checkpoint, which the run cannot end without; {before}, "
                                       f"and launching the run again resumes from it")
        if self.job.checkpoint.on_write_error == "fail":
            raise CheckpointWriteError(f"{message}; {before}, and launching the run again resumes from it "
                                       f"(checkpoint.on_write_error=continue trains on instead)")
        if self.rank == 0:
            warnings.warn(f"{message}; {before}; training goes on (checkpoint.on_write_error=continue) and tries "
                          f"again at the next checkpoint", stacklevel=1)
            self.tracker.log_metrics({"checkpoint_failed_step": state.step}, state.step)
        return False

    def after_step(self, done: StepOutcome, state: CheckpointState) -> None:
        step = done.step
        if step == self.job.train.steps or (done.event is None and step % self.job.checkpoint.every_steps):
            return
        metrics = {"step": step, "loss": done.loss, "lr": self.engine.get_lr()[0], **latest_val(state, self.validating)}
        written = self._checkpoint(state, metrics)
        if written and self.exports is not None:  # every rank's files are in storage once ``write`` returns
            self.exports.after_checkpoint(step)
        if done.event == "sigterm":
            saved = f"after saving the checkpoint of step {step}" if written else \
                f"at step {step}, whose checkpoint could not be written"
            raise WorkerPreempted(f"rank {self.rank} of run '{self.job.run_name}': a worker got SIGTERM; stopped "
                                  f"{saved}")

    def at_end(self, end: RunEnd) -> None:
        self._checkpoint(end.state, end.metrics, final=True)


def build_hooks(job: JobConfig, *, rank: int, world: int, engine: Any, tracker: Tracker,
                validation: Validation | None, exports: CheckpointExports | None, first_step: int,
                bar: WorkerConsole | None, baseline: float | None = None) -> list[Hook]:
    """The loop's components for this rank, in the order they are called. ``bar``: the console that draws rank 0's
    progress bar (None: no bar). ``baseline``: the held-out unigram cross-entropy, shown beside the validation loss
    and logged once (``unigram_baseline``) when given."""
    if baseline is not None:
        tracker.log_metrics({"unigram_baseline": baseline}, first_step)
    hooks: list[Hook] = [FaultInjection(job, rank), MetricsLog(job, engine, tracker)]
    if validation is not None:
        hooks.append(ValidationRun(job, validation, engine, tracker))
    if bar is not None and rank == 0:
        hooks.append(ProgressBar(job, first_step, bar, baseline))
    if exports is not None:
        hooks.append(ExportPoll(job, exports))
    hooks.append(Checkpointer(job, engine, rank, world, tracker, exports, validation is not None))
    return hooks
