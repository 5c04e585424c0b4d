"""Shared by the sampler and likelihood tests: the debug model trained on the copy language (~12 s, once)."""

from __future__ import annotations

import pytest

from dlmoe.model import DiffusionMoE
from dlmoe.train.copy_task import CopyTask, train_copy_model

TASK = CopyTask()


@pytest.fixture(scope="session")
def copy_model() -> DiffusionMoE:
    model, losses = train_copy_model(TASK, steps=300)
    assert sum(losses[-10:]) / 10 < 0.05, f"the copy language did not train: last losses {losses[-10:]}"
    return model
