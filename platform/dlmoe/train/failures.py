"""Which worker failures Ray Train retries, and what the driver says of a run that failed.

A mistake of the user's that a worker meets (a corrupt shard, a setting the data refuses: ``DataError``,
``ConfigError``), or a checkpoint its storage will not take (``CheckpointWriteError``), recurs in every restarted
worker group, each attempt costing a worker group start: such a failure
ends the run at once. Everything else (a crashed worker, a preemption, a lost node) is Ray Train's default policy,
retried up to ``train.max_failures`` times. Ray Train takes no failure policy through its public settings, so
``DlmoeTrainer`` hands its own to the controller (as ``preemption.TorchWithSigterm`` extends its torch backend).
"""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError
from ray.train.v2.torch.torch_trainer import TorchTrainer

from dlmoe.errors import CheckpointWriteError, ConfigError, DataError

NOT_RETRIED = (DataError, ConfigError, CheckpointWriteError)


def user_error(error: TrainingFailedError) -> tuple[int, Exception] | None:
    """The rank and error of the first worker whose failure is a user's mistake (``NOT_RETRIED``), or None."""
    if isinstance(error, WorkerGroupError):
        for rank, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, NOT_RETRIED):
                return rank, failure
    return None


def failure_message(run_name: str, error: TrainingFailedError) -> str:
    """What the driver says of a failed run: the user's mistake alone, else Ray Train's account of the workers'
    failures (with their tracebacks: that is a bug or an outage to look into)."""
    mistake = user_error(error)
    if mistake is not None:
        rank, failure = mistake
        return f"run '{run_name}' stopped: rank {rank}: {failure} (not retried: every attempt would meet it again)"
    return f"run '{run_name}' failed: {error}"


class UserErrorsFail(DefaultFailurePolicy):
    """Ray Train's default policy, except that a user's mistake (``user_error``) is raised at once."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if user_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class DlmoeTrainer(TorchTrainer):
    """``TorchTrainer`` whose controller decides with ``UserErrorsFail``."""

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        default = controller_init_kwargs["failure_policy"]  # Ray Train's, made from the run's FailureConfig
        controller_init_kwargs["failure_policy"] = UserErrorsFail(default.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
