"""The README's "What happens when…" table, as data: each row a situation, what the user sees, and the tests that
hold it. tests/unit/test_reliability_table.py checks that every named test exists and that the README's section is
exactly ``render()``; ``python -m tests.reliability_table`` (``make readme-table``) writes it into the README.

The bad-input rows are made from the case tables of the bad-input tests themselves, so a case added there shows
here (and in the README once re-rendered)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tests.integration.test_bad_inputs import RAY_GROUPS
from tests.unit.test_bad_inputs import ALONE, CLI_GROUPS, SPEC_CASES, URLS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- what-happens-when: begin (python -m tests.reliability_table renders it) -->"
END = "<!-- what-happens-when: end -->"


@dataclass(frozen=True)
class Row:
    when: str
    outcome: str
    tests: tuple[str, ...]  # node ids: path::function
    cases: tuple[str, ...] = ()  # the parametrised cases, when a row is a group of them


TRAINING = "tests/integration/test_training.py"
EXPORT = "tests/integration/test_export.py"
UNIT_BAD = "tests/unit/test_bad_inputs.py"
RAY_BAD = "tests/integration/test_bad_inputs.py"

FAULTS: tuple[Row, ...] = (
    Row("a worker process is killed mid-run",
        "Ray Train restarts the worker group from the newest checkpoint; the run ends with the same weights "
        "(params_sha256) as an uninterrupted one",
        (f"{TRAINING}::test_a_killed_worker_changes_nothing",)),
    Row("a worker gets SIGTERM, or its node is drained for preemption",
        "a checkpoint within seconds (at the end of the current step), listed in `interruptions`; the run resumes "
        "from it and ends with an uninterrupted run's weights",
        (f"{TRAINING}::test_sigterm_saves_a_checkpoint_then_the_run_resumes_from_it",
         "tests/integration/test_preemption.py::test_a_drained_node_gets_a_checkpoint_and_the_run_moves_on")),
    Row("the MLflow server stops mid-run and comes back",
        "training neither stops nor slows; one warning; what was logged meanwhile reaches the run, in order",
        ("tests/integration/test_tracking_outage.py::test_metrics_logged_while_mlflow_is_down_reach_the_run_in_order",)),
    Row("the driver is SIGKILLed mid-run",
        "relaunching the same run_name takes its lock over, resumes from the newest checkpoint and ends with an "
        "uninterrupted run's losses and weights",
        (f"{TRAINING}::test_a_driver_killed_mid_run_is_relaunched_and_resumes",)),
    Row("the same run_name is launched twice",
        "the second launch is refused at once, naming the host and pid holding `dlmoe_run.lock`; nothing is written",
        ("tests/unit/test_run_lock.py::test_a_second_launch_is_refused_naming_the_first_and_the_lock_goes_with_its_holder",
         "tests/unit/test_run_lock.py::test_dlmoe_train_refuses_a_run_in_use_before_starting_anything")),
    Row("the newest checkpoint is corrupt or truncated",
        "skipped with a warning naming the file; the run resumes (or exports) from the checkpoint before",
        (f"{TRAINING}::test_checkpoints_in_s3_survive_a_crash_and_a_corrupt_one_is_passed_over",
         f"{EXPORT}::test_a_corrupt_file_is_named_and_a_run_falls_back_to_the_checkpoint_before")),
    Row("a checkpoint cannot be written (the disk is full, or storage refuses writes)",
        "what was written of it is removed and the checkpoints before it stay valid; by default the run stops at once "
        "(not retried), naming the folder, the error and the checkpoint it will resume from; with "
        "`checkpoint.on_write_error=continue` a warning (and the metric `checkpoint_failed_step`) and training goes "
        "on, trying again at the next checkpoint — but a run never ends without its last checkpoint",
        (f"{TRAINING}::test_a_disk_that_fills_up_leaves_the_checkpoint_before_it_resumable",
         "tests/unit/test_train_hooks.py::test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_its_folder",
         "tests/unit/test_checkpoint_files.py::test_storage_that_refuses_the_write_is_named")),
    Row("an export target cannot be written, or its S3 bucket is missing",
        "`dlmoe export` refuses, naming the folder, and leaves it as it was; during training a warning, the metric "
        "`export_failed_step` and an artifact report it, and training goes on",
        (f"{EXPORT}::test_a_target_that_cannot_be_written_is_not_taken_for_a_bad_checkpoint",
         f"{EXPORT}::test_a_failing_export_never_stops_training")),
    Row("the S3 endpoint is killed and restarted mid-epoch (SeaweedFS, a store whose data survives)",
        "the stream warns that storage looks unavailable, reads the window again and goes on: no sample repeated "
        "or skipped, the same rows as an undisturbed read",
        ("tests/integration/test_s3_seaweedfs.py::test_the_stream_goes_on_across_a_restart_of_the_endpoint",)),
    Row("an S3 command runs on busy cores",
        "it exits with its own status (no abort at interpreter exit)",
        ("tests/integration/test_data_pipeline.py::test_s3_commands_exit_cleanly_on_busy_cores",)),
)

_GROUPS = {
    "config": ("a config key or value is wrong (`key=value` overrides; `info --flavor`)",
               "exit 2, `dlmoe: error:` naming the key and where it came from, before anything starts"),
    "job-yaml": ("a job YAML is missing, unparsable, a list, or has an unknown section or a wrong type",
                 "exit 2 naming the file (and the key)"),
    "data": ("input data is missing, empty or corrupt, or made with another tokenizer; a training shard is "
             "truncated (refused at launch, by its size) or corrupt (met by a worker)",
             "exit 2 naming the folder, file, shard or dataset; a corrupt shard is not retried and its MLflow run "
             "ends FAILED saying why (`data verify`, `data info`: exit 1 naming each bad shard)"),
    "sampler": ("`generate` / `eval` get impossible settings or a folder that is no model",
                "exit 2 naming the setting or folder, checked before the model loads; a checkpoint folder is told "
                "to `dlmoe export` first"),
    "dashboard": ("`dashboard` gets a bad port, a port in use, a bad tracking URI or threshold, or a store that "
                  "does not exist",
                  "exit 2 naming the flag, the address or the store; no store is created"),
    "export": ("`export` gets a source that is no run or checkpoint, or a bad `--register` tracking URI",
               "exit 2 naming the source or URI; nothing is written"),
}


def bad_input_rows() -> tuple[Row, ...]:
    rows = []
    for group, (when, outcome) in _GROUPS.items():
        tests = [f"{UNIT_BAD}::test_a_bad_command_line_exits_naming_what_is_wrong"]
        cases = list(CLI_GROUPS[group])
        if group in RAY_GROUPS:
            tests.append(f"{RAY_BAD}::test_bad_data_exits_naming_the_file_or_dataset")
            cases += list(RAY_GROUPS[group])
        if group == "data":
            tests += [f"{RAY_BAD}::test_the_mlflow_run_of_a_run_stopped_by_a_corrupt_shard_ends_failed_saying_why",
                      "tests/unit/test_failure_policy.py::"
                      "test_a_users_mistake_in_a_worker_is_raised_at_once_and_a_crash_is_retried"]
        rows.append(Row(when, outcome, tuple(tests), tuple(cases)))
    rows.append(Row("a first-hour mistake of issue 22 (`bogus://` tracking URIs, `train.steps` without `=`, "
                    "`--port 99999`, a mistyped dashboard store), as the real command",
                    "one `dlmoe: error:` line, exit 2, no traceback",
                    (f"{UNIT_BAD}::test_a_first_hour_mistake_is_one_error_line_from_the_real_command",), tuple(ALONE)))
    rows.append(Row("a DiffusionTrainingJob field is invalid (each field: wrong type, below its minimum, outside "
                    "its enum, empty, missing)",
                    "the CRD schema rejects it at admission; the operator's own check names `spec.<field>` (the job "
                    "turns Failed with that message and an Event)",
                    (f"{UNIT_BAD}::test_a_bad_custom_resource_field_is_refused_by_the_crd_and_named_by_the_operator",
                     "tests/integration/test_operator.py::test_invalid_spec_fails_naming_the_field_and_creates_nothing"),
                    tuple(SPEC_CASES)))
    rows.append(Row("a dashboard URL names an unknown run, step, page or asset",
                    "a 404 page that says what was not found",
                    (f"{UNIT_BAD}::test_a_bad_dashboard_url_is_a_page_that_says_so",), tuple(URLS)))
    return tuple(rows)


def rows() -> tuple[Row, ...]:
    return FAULTS + bad_input_rows()


def _cell(row: Row) -> str:
    names = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in row.tests)
    return f"{names}<br>({len(row.cases)} cases)" if row.cases else names


def render() -> str:
    lines = [BEGIN, "", "| When… | What you see | Tested by |", "|---|---|---|"]
    lines += [f"| {row.when} | {row.outcome} | {_cell(row)} |" for row in rows()]
    lines += ["", END]
    return "\n".join(lines)


def readme_section(text: str) -> str:
    """The README's section between the markers, markers included."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main() -> int:
    text = README.read_text()
    README.write_text(text.replace(readme_section(text), render()))
    print(f"{README}: 'What happens when…' rendered ({len(rows())} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
