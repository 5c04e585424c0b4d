"""The training loop's components (dlmoe.train.hooks, dlmoe.train.step.Throughput) and the checkpoint state
(dlmoe.checkpointing), each on its own: a real job config, fakes for the engine, the tracker and Ray's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from data_pipeline import storage
from dlmoe.checkpointing import CheckpointState, check_resumable, checkpoint_shape, run_folder
from dlmoe.config import JobConfig, load_job_config
from dlmoe.errors import CheckpointError, CheckpointWriteError, ConfigError, WorkerPreempted
from dlmoe.tracking import Tracker
from dlmoe.train.hooks import (
    FAULT_MARK,
    Checkpointer,
    ExportPoll,
    FaultInjection,
    MetricsLog,
    ProgressBar,
    RunEnd,
    ValidationRun,
)
from dlmoe.train.step import StepOutcome, Throughput


class Recorder(Tracker):
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, name: str, content: str) -> None:
        self.artifacts.append(name)

    def steps_with(self, key: str) -> list[int]:
        return [step for step, metrics in self.metrics if key in metrics]


class Engine:
    def get_lr(self) -> list[float]:
        return [0.5]

    def get_global_grad_norm(self) -> float:
        return 2.0


def job(tmp_path: Path, *overrides: str) -> JobConfig:
    return load_job_config(None, ["train.steps=6", "train.warmup_steps=1", f"checkpoint.storage={tmp_path}",
                                  *overrides])


def outcome(step: int, event: str | None = None, counts: bool = True) -> StepOutcome:
    return StepOutcome(step=step, loss=1.0 / step, balance_loss=1.0, z_loss=0.1,
                       counts_RLE=torch.ones(2, 2, 8) if counts else None, event=event, tokens_per_s=100.0, epoch=0,
                       next_sample=8 * step)


def run_steps(hook: Any, job: JobConfig, events: dict[int, str] | None = None) -> CheckpointState:
    state = CheckpointState.new(job)
    for step in range(1, job.train.steps + 1):
        done = outcome(step, (events or {}).get(step))
        state.advance(done.step, done.loss, epoch=done.epoch, next_sample=done.next_sample, interruption=done.event)
        hook.after_step(done, state)
    return state


def test_the_state_file_round_trips_and_names_a_file_that_is_not_one(tmp_path: Path) -> None:
    state = CheckpointState.new(job(tmp_path))
    state.advance(1, 2.5, epoch=0, next_sample=8, interruption="preemption")
    again = CheckpointState.from_json(state.to_json(), "x")
    assert again == state and again.interruptions == [{"step": 1, "cause": "preemption"}]
    assert again.ep_size == 2 and again.tokenizer == "byte" and again.model_config("x").num_experts == 8
    assert list(json.loads(state.to_json())) == ["step", "epoch", "sample_in_epoch", "losses", "restarts",
                                                 "checkpoints", "interruptions", "val_losses", "shape",
                                                 "config_hash", "run_name", "flavor", "recipe"]
    with pytest.raises(CheckpointError, match=r"s3://b/run/checkpoint_1/dlmoe_state.json is not a dlmoe"):
        CheckpointState.from_json(b"[1, 2]", "s3://b/run/checkpoint_1/dlmoe_state.json")
    with pytest.raises(CheckpointError, match="does not describe the checkpoint's model"):
        CheckpointState(step=3).model_config("here")


def test_a_state_from_before_some_fields_existed_still_reads(tmp_path: Path) -> None:
    old = {"step": 4, "epoch": 0, "sample_in_epoch": 32, "losses": [1.0] * 4, "restarts": 0, "checkpoints": [4],
           "shape": checkpoint_shape(job(tmp_path)), "config_hash": "abc"}
    state = CheckpointState.from_json(json.dumps(old), "old")
    assert state.step == 4 and state.val_losses == [] and state.interruptions == [] and state.flavor is None


def test_a_refused_resume_names_each_changed_field_with_both_values(tmp_path: Path) -> None:
    state = CheckpointState.new(job(tmp_path))
    assert state.changes(job(tmp_path, "train.lr=0.1")) == []  # not bound to the checkpoint
    changed = job(tmp_path, "model.num_hidden_layers=3", "data.seed=7")
    assert state.changes(changed) == ["data.seed: checkpoint 1234, job 7",
                                      "model.moe_layer_freq: checkpoint [1, 1], job [1, 1, 1]",
                                      "model.num_hidden_layers: checkpoint 2, job 3"]
    with pytest.raises(ConfigError, match=r"cannot resume: its checkpoint \(step 0\) was made with other settings "
                                          r"\(data.seed: checkpoint 1234, job 7; .*; model.num_hidden_layers: "
                                          r"checkpoint 2, job 3\)"):
        check_resumable(changed, state, "here")


def test_run_folder_is_a_full_uri(tmp_path: Path) -> None:
    assert run_folder(job(tmp_path)).uri == f"{tmp_path}/debug"
    s3 = run_folder(job(tmp_path, "checkpoint.storage=s3://bucket/runs", "data.endpoint_url=http://127.0.0.1:1"))
    assert s3.uri == "s3://bucket/runs/debug" and s3.path == "bucket/runs/debug"


def test_fault_injection_stops_the_one_rank_once(tmp_path: Path) -> None:
    exits: list[int] = []
    config = job(tmp_path, "fault_injection.rank=1", "fault_injection.step=3")
    other = FaultInjection(config, 0, exit=exits.append)
    for step in range(6):
        other.before_step(step)
    assert exits == []
    hook = FaultInjection(config, 1, exit=exits.append)
    for step in range(6):
        hook.before_step(step)
    assert exits == [17]
    mark = storage.resolve(f"{tmp_path}/debug/{FAULT_MARK}")
    assert storage.read_bytes(mark) == b"rank 1 given kill at step 3\n"
    FaultInjection(config, 1, exit=exits.append).before_step(3)  # a restarted worker group: the mark stays
    assert exits == [17]


def test_metrics_are_logged_every_log_every_steps_and_at_the_end(tmp_path: Path) -> None:
    tracker = Recorder()
    config = job(tmp_path, "train.steps=7", "train.log_every=3", "monitor.expert_load_every=4")
    run_steps(MetricsLog(config, Engine(), tracker), config)
    assert tracker.steps_with("loss") == [3, 6, 7]
    _, first = tracker.metrics[0]
    assert first["loss"] == pytest.approx(1 / 3) and first["lr"] == 0.5 and first["grad_norm"] == 2.0
    assert first["tokens_per_s"] == 100.0 and any(key.startswith("moe") for key in first)
    assert tracker.artifacts == ["expert_load/step-00000004.json", "expert_load/step-00000007.json"]


def test_validation_runs_every_eval_every_steps_and_at_the_end(tmp_path: Path) -> None:
    class Held:
        calls = 0

        def evaluate(self, engine: Any) -> float:
            self.calls += 1
            return 3.0 - self.calls

    tracker = Recorder()
    config = job(tmp_path, "train.steps=5", "train.eval_every=2", f"data.validation={tmp_path}")
    state = run_steps(ValidationRun(config, Held(), Engine(), tracker), config)  # type: ignore[arg-type]
    assert state.val_losses == [[2, 2.0], [4, 1.0], [5, 0.0]]
    assert tracker.steps_with("val_loss") == [2, 4, 5]


class Exports:
    run_id = "run-1"

    def __init__(self) -> None:
        self.polls: list[bool] = []
        self.failures: list[int] = []
        self.checkpoints: list[int] = []

    def poll(self, wait: bool = False) -> None:
        self.polls.append(wait)

    def failed(self, step: int, exc: BaseException) -> None:
        self.failures.append(step)

    def after_checkpoint(self, step: int) -> None:
        self.checkpoints.append(step)


def test_the_final_export_waits_for_the_tasks_and_never_fails_training(tmp_path: Path) -> None:
    config, exports = job(tmp_path), Exports()
    written: list[tuple[int, str | None]] = []

    def final(job: JobConfig, full: dict[str, torch.Tensor], step: int, run_id: str | None) -> str:
        written.append((step, run_id))
        return "out/hf"

    hook = ExportPoll(config, exports, final)  # type: ignore[arg-type]
    run_steps(hook, config)
    end = RunEnd(CheckpointState(step=6), {})
    hook.at_end(end)
    assert exports.polls == [False] * 6 + [True] and written == [(6, "run-1")] and end.metrics["export"] == "out/hf"

    def broken(*args: Any) -> str:
        raise OSError("disk full")

    failing = ExportPoll(config, exports, broken)  # type: ignore[arg-type]
    end = RunEnd(CheckpointState(step=6), {})
    failing.at_end(end)
    assert exports.failures == [6] and "export" not in end.metrics


class Reports:
    """Ray's report and the checkpoint writer, recorded; ``refuse`` holds the steps whose writes fail."""

    def __init__(self, refuse: tuple[int, ...] = ()) -> None:
        self.reports: list[dict[str, Any]] = []
        self.saved: list[int] = []
        self.refuse = refuse

    def report(self, metrics: dict[str, Any], checkpoint: storage.Location) -> None:
        self.reports.append(dict(metrics, checkpoint=checkpoint.uri.rsplit("/", 1)[1]))

    def write(self, engine: Any, state: CheckpointState, rank: int, target: storage.Location,
              gather: Any) -> list[str]:
        storage.write_bytes(target.child("part"), b"written")
        if state.step in self.refuse:
            return ["", "rank 1: cannot write it: [Errno 28] No space left on device"]
        self.saved.append(state.step)
        return ["", ""]


def checkpointer(config: JobConfig, ray: Reports, exports: Exports | None = None,
                 tracker: Tracker | None = None) -> Checkpointer:
    return Checkpointer(config, Engine(), 0, 1, tracker or Recorder(), exports, False,  # type: ignore[arg-type]
                        report=ray.report, write=ray.write)


def step_of(folder: str | None) -> int:
    assert folder is not None and folder.startswith("checkpoint_step")
    return int(folder[len("checkpoint_step"):].split("_")[0])


def test_checkpoints_every_every_steps_and_on_preemption_never_twice_at_the_end(tmp_path: Path) -> None:
    ray, exports, tracker = Reports(), Exports(), Recorder()
    config = job(tmp_path, "train.steps=7", "checkpoint.every_steps=3")
    hook = checkpointer(config, ray, exports, tracker)
    state = run_steps(hook, config, events={4: "preemption"})
    assert ray.saved == [3, 4, 6] and state.checkpoints == [3, 4, 6] and exports.checkpoints == [3, 4, 6]
    first = dict(ray.reports[0])
    assert step_of(first.pop("checkpoint")) == 3 and first == {"step": 3, "loss": pytest.approx(1 / 3), "lr": 0.5}
    assert tracker.steps_with("checkpoint_step") == [3, 4, 6]
    end = RunEnd(state, {}, {"step": 7})
    hook.at_end(end)
    last = dict(ray.reports[-1])
    assert ray.saved[-1] == 7 and step_of(last.pop("checkpoint")) == 7
    assert last == {"step": 7, "checkpoints": [3, 4, 6, 7]}
    assert len({r["checkpoint"] for r in ray.reports}) == 4  # a folder of its own each


def test_a_relaunch_of_a_finished_run_reports_without_a_new_checkpoint_step(tmp_path: Path) -> None:
    ray = Reports()
    state = CheckpointState(step=6, checkpoints=[4, 6])
    checkpointer(job(tmp_path), ray).at_end(RunEnd(state, {}))
    assert state.checkpoints == [4, 6] and ray.reports[-1]["checkpoints"] == [4, 6]


def test_sigterm_saves_then_stops_the_worker(tmp_path: Path) -> None:
    ray = Reports()
    config = job(tmp_path, "checkpoint.every_steps=100")
    with pytest.raises(WorkerPreempted, match="stopped after saving the checkpoint of step 2"):
        run_steps(checkpointer(config, ray), config, events={2: "sigterm"})
    assert ray.saved == [2]


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_its_folder(tmp_path: Path) -> None:
    ray, exports = Reports(refuse=(4,)), Exports()
    config = job(tmp_path, "checkpoint.every_steps=2")
    with pytest.raises(CheckpointWriteError) as stopped:
        run_steps(checkpointer(config, ray, exports), config)
    error = stopped.value
    assert f"the checkpoint of step 4 could not be written to {tmp_path}/debug/checkpoint_step00000004_" in str(error)
    assert "rank 1: cannot write it: [Errno 28] No space left on device" in str(error)
    assert "the checkpoint of step 2 is intact" in str(error) and "on_write_error=continue" in str(error)
    assert ray.saved == [2] and exports.checkpoints == [2] and len(ray.reports) == 1
    # What was written of the failed checkpoint is gone; the one before stays.
    assert [p.name.split("_")[1] for p in (tmp_path / "debug").glob("checkpoint_*")] == ["step00000002"]


def test_with_on_write_error_continue_training_goes_on_and_the_next_checkpoint_tries_again(tmp_path: Path) -> None:
    ray, exports, tracker = Reports(refuse=(2, 6)), Exports(), Recorder()
    config = job(tmp_path, "checkpoint.every_steps=2", "checkpoint.on_write_error=continue")
    hook = checkpointer(config, ray, exports, tracker)
    with pytest.warns(UserWarning, match=r"checkpoint of step 2 could not be written .* there is no earlier "
                                         r"checkpoint; training goes on"):
        state = run_steps(hook, config)
    assert state.checkpoints == [4] and exports.checkpoints == [4]
    assert tracker.steps_with("checkpoint_failed_step") == [2]
    # The last checkpoint is not done without, whatever the setting.
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 6 could not be written .* the last "
                                                   "checkpoint, which the run cannot end without; the checkpoint of "
                                                   "step 4 is intact"):
        hook.at_end(RunEnd(state, {}, {"step": 6}))
    assert state.checkpoints == [4] and [r["step"] for r in ray.reports] == [4]


def test_the_progress_line_shows_step_loss_validation_and_rate(tmp_path: Path) -> None:
    bar = ProgressBar.__new__(ProgressBar)
    bar.run_name, bar.baseline = "debug", None
    assert bar.describe(outcome(4), CheckpointState()) == "train debug step 4 loss 0.250 100 tok/s"
    state = CheckpointState(val_losses=[[2, 1.23456]])
    assert bar.describe(outcome(4), state) == "train debug step 4 loss 0.250 val 1.235 100 tok/s"
    bar.baseline = 3.21
    assert bar.describe(outcome(4), state) == "train debug step 4 loss 0.250 val 1.235 (unigram 3.210) 100 tok/s"


def test_throughput_measures_the_second_half_of_the_launch() -> None:
    meter = Throughput(world=2, first_step=4, steps=10)
    assert meter.measure_from == 7
    for step in range(5, 11):
        assert meter.add(step, 100) > 0
    assert meter.tokens == 600 and meter.warm_tokens == 300 and meter.steady() > 0
