"""Which worker failures Ray Train retries (dlmoe.train.failures): a user's mistake a worker meets (a corrupt shard)
ends the run at once with its message; a crash is retried as Ray Train's default policy retries it."""

from __future__ import annotations

from typing import Any

import pytest
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.v2.api.exceptions import WorkerGroupError

from dlmoe.errors import ConfigError, DataError
from dlmoe.train.failures import DlmoeTrainer, UserErrorsFail, failure_message

CORRUPT = DataError("shard s3://b/d/shard-000001.parquet is corrupt: sha256 0a1b… differs from the manifest's 9f8e…")


def test_a_users_mistake_in_a_worker_is_raised_at_once_and_a_crash_is_retried() -> None:
    policy = UserErrorsFail(FailureConfig(max_failures=2))
    collateral = RuntimeError("gloo: connection reset by peer")  # what the other rank meets meanwhile
    assert policy.make_decision(WorkerGroupError("x", {1: collateral, 0: CORRUPT})) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("x", {0: ConfigError("bad", key="data.seq_len")})) == \
        FailureDecision.RAISE
    crash = WorkerGroupError("x", {1: collateral})
    assert [policy.make_decision(crash) for _ in range(3)] == [FailureDecision.RETRY] * 2 + [FailureDecision.RAISE]


def test_the_message_of_a_stopped_run_is_the_mistake_alone() -> None:
    mistake = WorkerGroupError("rank 0 Traceback (most recent call last): ...", {0: CORRUPT})
    assert failure_message("demo", mistake) == (f"run 'demo' stopped: rank 0: {CORRUPT} (not retried: every attempt "
                                                f"would meet it again)")
    crash = WorkerGroupError("rank 1 Traceback (most recent call last): ...", {1: RuntimeError("killed")})
    assert failure_message("demo", crash).startswith("run 'demo' failed: Training failed due to worker errors")


def test_the_trainer_hands_its_policy_to_the_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller",
                        lambda self, **kwargs: seen.update(kwargs))
    trainer = DlmoeTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(failure_config=FailureConfig(max_failures=3)))
    failure_config = FailureConfig(max_failures=3)
    trainer._initialize_and_run_controller(failure_policy=DefaultFailurePolicy(failure_config), callbacks=[])
    assert isinstance(seen["failure_policy"], UserErrorsFail)
    assert seen["failure_policy"].failure_config is failure_config and seen["callbacks"] == []
