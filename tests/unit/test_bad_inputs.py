"""Bad inputs, each one row: what a user types or hands over wrongly — config keys and values, job YAML, data,
command-line flags, export sources, tracking URIs, custom-resource fields, dashboard URLs — and what they get back:
the exit status and a message naming the key, file, URI, flag or field, never a traceback.

The command lines run in child processes (``tests/cli_batch.py``): most in one batch, so the imports are paid once,
and the first-hour cases of issue 22 each as its own ``python -m dlmoe.cli``. None of them starts Ray; the data
cases that need Ray Data are in tests/integration/test_bad_inputs.py."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.shards import Manifest, shard_name, write_manifest, write_shard
from data_pipeline.tokenizers import byte_tokenizer
from operators.spec import FIELDS, Field, validate
from tests.cli_batch import Outcome, finish, run_batch, start_alone
from tests.unit.test_operator_render import minimal_spec, schema_errors

USAGE = 2  # what main() returns for a DlmoeError, and argparse for a malformed command line


@dataclass(frozen=True)
class Case:
    """One command line (``{ws}`` is the workspace folder, ``{port}`` a port in use) and what it must answer."""

    argv: str
    names: tuple[str, ...]  # every one of these appears in stderr
    code: int = USAGE


CLI_GROUPS: dict[str, dict[str, Case]] = {
    "config": {
        "unknown-key": Case("train model.num_expert=3", ("model.num_expert", "command-line override")),
        "unknown-section": Case("train foo.bar=1", ("'foo'",)),
        "wrong-type-value": Case("train model.num_experts=abc", ("model.num_experts", "abc")),
        "top-k-above-experts": Case("train model.num_experts_per_tok=99", ("model.num_experts_per_tok", "exceeds")),
        "ep-size-not-dividing": Case("train parallel.ep_size=3", ("parallel.ep_size",)),
        "seq-len-above-positions": Case("train data.seq_len=4096", ("data.seq_len", "max_position_embeddings")),
        "unknown-flavor": Case("train model.flavor=nope", ("model.flavor", "nope")),
        "override-without-equals": Case("train train.steps", ("train.steps", "key=value")),
        "override-without-equals-after-job": Case("train {ws}/good.yaml train.steps", ("train.steps", "key=value")),
        "tracking-uri-scheme": Case("train tracking.uri=bogus://x", ("bogus://x", "tracking.uri")),
        "info-unknown-flavor": Case("info --flavor nope", ("nope", "model.flavor")),
    },
    "job-yaml": {
        "job-file-missing": Case("train {ws}/absent.yaml", ("job file not found", "absent.yaml")),
        "job-yaml-syntax": Case("train {ws}/syntax.yaml", ("cannot parse YAML", "syntax.yaml")),
        "job-yaml-list": Case("train {ws}/list.yaml", ("mapping", "list.yaml")),
        "job-yaml-unknown-section": Case("train {ws}/section.yaml", ("modle", "section.yaml")),
        "job-yaml-wrong-type": Case("train {ws}/type.yaml", ("data.seq_len", "type.yaml")),
        "job-yaml-section-not-mapping": Case("train {ws}/scalar.yaml", ("key 'train'", "scalar.yaml")),
    },
    "data": {
        "tokenize-missing-input": Case("tokenize --input {ws}/absent --output {ws}/out --seq-len 16", ("absent",)),
        "tokenize-empty-folder": Case("tokenize --input {ws}/empty --output {ws}/out --seq-len 16", ("empty",)),
        "tokenize-seq-len-1": Case("tokenize --input {ws}/empty --output {ws}/out --seq-len 1", ("--seq-len",)),
        "tokenize-sft-not-jsonl": Case("tokenize --input {ws}/empty --output {ws}/out --seq-len 16 --sft",
                                       ("--sft", "jsonl")),
        "data-verify-corrupt-shard": Case("data verify {ws}/corrupt", (shard_name(1), "1 of 3 shards"), code=1),
        "data-verify-missing": Case("data verify {ws}/absent", ("absent",)),
        "data-info-no-manifest": Case("data info {ws}/empty", ("manifest.json", "empty")),
        "data-info-truncated-shard": Case("data info {ws}/truncated",
                                          (f"truncated/{shard_name(2)} has 100 bytes, the manifest says",), code=1),
        "eval-mismatched-tokenizer": Case("eval {ws}/model --tasks elbo:{ws}/dataset --no-progress",
                                          ("dataset", "tokenized with")),
    },
    "sampler": {
        "generate-threshold-above-1": Case("generate {ws}/absent --prompt hi --threshold 2", ("threshold", "got 2.0")),
        "generate-gen-length-0": Case("generate {ws}/absent --prompt hi --gen-length 0", ("gen_length", "got 0")),
        "generate-block-not-dividing": Case("generate {ws}/absent --prompt hi --gen-length 64 --block-length 24",
                                            ("block_length 24",)),
        "generate-steps-not-multiple": Case("generate {ws}/absent --prompt hi --steps 3", ("steps 3",)),
        "generate-negative-temperature": Case("generate {ws}/absent --prompt hi --temperature -1", ("temperature",)),
        "generate-prompt-longer-than-context": Case("generate {ws}/model --prompt " + "x" * 600,
                                                    ("600 tokens", "context of 512")),
        "generate-missing-folder": Case("generate {ws}/absent --prompt hi", ("absent", "does not exist")),
        "generate-folder-without-config": Case("generate {ws}/empty --prompt hi", ("config.json",)),
        "generate-checkpoint-folder": Case("generate {ws}/checkpoint --prompt hi", ("export it first", "dlmoe export")),
        "generate-run-folder": Case("generate {ws}/run --prompt hi", ("export it first", "dlmoe export")),
        "generate-model-without-tokenizer": Case("generate {ws}/bare-model --prompt hi", ("tokenizer.json",)),
        "eval-unknown-task": Case("eval {ws}/absent --tasks no_such_task_xyz", ("no_such_task_xyz",)),
        "eval-threshold-above-1": Case("eval {ws}/absent --tasks quick --threshold 2", ("threshold",)),
    },
    "dashboard": {
        "dashboard-port-out-of-range": Case("dashboard --port 99999", ("--port", "99999")),
        "dashboard-port-in-use": Case("dashboard --tracking-uri sqlite:///{ws}/mlflow.db --port {port}",
                                      ("cannot listen", "{port}")),
        "dashboard-folder-store": Case("dashboard --tracking-uri {ws}/mlruns --port 0",
                                       ("cannot open the MLflow tracking store at", "mlruns")),
        "dashboard-missing-store": Case("dashboard --tracking-uri sqlite:///{ws}/absent/mlflow.db --port 0",
                                        ("no MLflow tracking store", "absent/mlflow.db does not exist")),
        "dashboard-tracking-uri-scheme": Case("dashboard --tracking-uri bogus://x --port 0", ("bogus://x",)),
        "dashboard-threshold-1": Case("dashboard --imbalance-threshold 1 --port 0", ("--imbalance-threshold",)),
        "dashboard-refresh-0": Case("dashboard --refresh-seconds 0 --port 0", ("--refresh-seconds",)),
    },
    "export": {
        "export-missing-source": Case("export {ws}/absent --out {ws}/hf-a", ("absent", "does not exist")),
        "export-not-a-run": Case("export {ws}/empty --out {ws}/hf-b", ("empty", "neither a checkpoint")),
        "export-broken-checkpoint": Case("export {ws}/checkpoint --out {ws}/hf-c",
                                         ("checkpoint/dlmoe_state.json", "not a dlmoe checkpoint state")),
        "export-register-tracking-uri": Case("export {ws}/absent --out {ws}/hf-d --register m --tracking-uri bogus://x",
                                             ("bogus://x", "--tracking-uri")),
        "export-dtype": Case("export {ws}/absent --out {ws}/hf-e --dtype fp16", ("--dtype", "fp16")),
    },
}
CLI_CASES: dict[str, Case] = {name: case for group in CLI_GROUPS.values() for name, case in group.items()}


def write_dataset(folder: Path, fingerprint: str, shards: int = 3, seq_len: int = 16) -> None:
    """A tokenized dataset of byte-level rows whose manifest names ``fingerprint`` as its tokenizer."""
    loc = storage.resolve(str(folder))
    tok = byte_tokenizer()
    infos = [write_shard(loc, shard_name(i), np.full((4, seq_len), 65 + i, dtype=np.int32)) for i in range(shards)]
    tokenizer = {"name": "other", "fingerprint": fingerprint, "vocab_size": 259, "eos_id": tok.special.eos,
                 "pad_id": tok.special.pad, "mask_id": tok.special.mask}
    write_manifest(loc, Manifest(kind="pretrain", seq_len=seq_len, tokenizer=tokenizer, shards=infos, source=["x"]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dlmoe.export import save_pretrained
    from dlmoe.model import build_model, get_flavor

    ws = tmp_path_factory.mktemp("bad-inputs")
    (ws / "good.yaml").write_text("train:\n  steps: 5\n")
    (ws / "syntax.yaml").write_text("model:\n  flavor: [debug\n")
    (ws / "list.yaml").write_text("- model\n- train\n")
    (ws / "section.yaml").write_text("modle:\n  flavor: debug\n")
    (ws / "type.yaml").write_text("data:\n  seq_len: long\n")
    (ws / "scalar.yaml").write_text("train: 5\n")
    (ws / "empty").mkdir()
    save_pretrained(build_model(get_flavor("debug")), ws / "model", tokenizer=byte_tokenizer())
    save_pretrained(build_model(get_flavor("debug")), ws / "bare-model")
    write_dataset(ws / "dataset", fingerprint="0" * 64)
    write_dataset(ws / "corrupt", fingerprint=byte_tokenizer().fingerprint)
    write_dataset(ws / "truncated", fingerprint=byte_tokenizer().fingerprint)
    (ws / "truncated" / shard_name(2)).write_bytes(b"PAR1" + bytes(96))
    (ws / "mlruns").mkdir()  # a folder store, which MLflow no longer opens by default
    (ws / "mlflow.db").touch()  # a store that exists (MLflow makes its tables)
    shard = ws / "corrupt" / shard_name(1)
    shard.write_bytes(b"PAR1" + bytes(shard.stat().st_size - 4))  # same size, garbage inside
    (ws / "checkpoint").mkdir()
    (ws / "checkpoint" / "dlmoe_state.json").write_text("{not json")
    (ws / "run" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (ws / "run" / "checkpoint_2026-01-01_00-00-00.000000" / "dlmoe_state.json").write_text("{}")
    return ws


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def batch(workspace: Path, busy_port: int) -> tuple[dict[str, Outcome], str]:
    cases = {name: case.argv.format(ws=workspace, port=busy_port).split() for name, case in CLI_CASES.items()}
    return run_batch(cases, cwd=workspace)


def test_the_batch_child_printed_no_traceback(batch: tuple[dict[str, Outcome], str]) -> None:
    assert "Traceback" not in batch[1], batch[1][-3000:]


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_a_bad_command_line_exits_naming_what_is_wrong(name: str, batch: tuple[dict[str, Outcome], str],
                                                       busy_port: int) -> None:
    case, outcome = CLI_CASES[name], batch[0][name]
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code == case.code, outcome.stderr
    # ``dlmoe: error: ...`` from main, ``dlmoe export: error: argument ...`` from argparse, ``BAD ...`` from verify
    assert ("error: " if case.code == USAGE else "BAD ") in outcome.stderr, outcome.stderr
    for needle in case.names:
        assert needle.format(port=busy_port) in outcome.stderr, outcome.stderr


def test_no_bad_command_line_left_a_folder_behind(batch: tuple[dict[str, Outcome], str], workspace: Path) -> None:
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(("hf-", "out"))]


# -- issue 22's first-hour cases, each as the real command ------------------------------------------------------------

ALONE: dict[str, tuple[str, tuple[str, ...]]] = {
    "train-tracking-uri": ("train tracking.uri=bogus://x", ("'bogus://x'", "tracking.uri")),
    "train-override-without-equals": ("train train.steps", ("key=value", "train.steps")),
    "dashboard-tracking-uri": ("dashboard --tracking-uri bogus://x --port 0", ("'bogus://x'", "--tracking-uri")),
    "dashboard-port": ("dashboard --port 99999", ("--port", "99999")),
    "dashboard-missing-store": ("dashboard --tracking-uri sqlite:///{ws}/typo/mlflow.db --port 0",
                                ("no MLflow tracking store at sqlite:///", "typo/mlflow.db does not exist")),
    "export-register-tracking-uri": ("export {ws}/absent --out {ws}/hf-alone --register m --tracking-uri bogus://x",
                                     ("'bogus://x'", "--tracking-uri")),
}


@pytest.fixture(scope="module")
def alone(workspace: Path) -> dict[str, Outcome]:
    started = {name: start_alone(argv.format(ws=workspace).split(), cwd=workspace)
               for name, (argv, _) in ALONE.items()}
    return {name: finish(proc) for name, proc in started.items()}


@pytest.mark.parametrize("name", sorted(ALONE))
def test_a_first_hour_mistake_is_one_error_line_from_the_real_command(name: str, alone: dict[str, Outcome],
                                                                      workspace: Path) -> None:
    outcome = alone[name]
    assert outcome.code == USAGE, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert outcome.stderr.startswith("dlmoe: error: "), outcome.stderr
    for needle in ALONE[name][1]:
        assert needle in outcome.stderr
    assert not (workspace / "hf-alone").exists()  # export --register refused before writing anything
    assert not (workspace / "typo").exists()  # the dashboard created no store where none was


# -- the DiffusionTrainingJob spec: every field, each rule it can break ----------------------------------------------

def _leaves(fields: dict[str, Field] | Any, prefix: str = "") -> Iterator[tuple[str, Field]]:
    for name, rule in fields.items():
        yield prefix + name, rule
        if rule.kind == "object":
            yield from _leaves(rule.fields, f"{prefix}{name}.")


WRONG_TYPE = {"str": 5, "quantity": [], "int": "3", "number": "high", "bool": "yes", "object": "text",
              "free": "text", "strings": "a=b"}


def _spec_cases() -> dict[str, tuple[str, Any]]:
    """``field path → (the change, the bad value)`` for every field of the spec: a value of the wrong type, and
    below its minimum, outside its enum, not matching its pattern, or missing when required."""
    cases: dict[str, tuple[str, Any]] = {}
    for path, rule in _leaves(FIELDS):
        cases[f"{path}:type"] = (path, WRONG_TYPE[rule.kind])
        if rule.minimum is not None:
            cases[f"{path}:minimum"] = (path, int(rule.minimum) - 1)
        if rule.enum:
            cases[f"{path}:enum"] = (path, "Bogus")
        if rule.pattern is not None:
            cases[f"{path}:pattern"] = (path, ["no-equals"] if rule.kind == "strings" else
                                        "" if rule.pattern == "." else "lots")
        if rule.required:
            cases[f"{path}:required"] = (path, None)
    return cases


SPEC_CASES = _spec_cases()


def _with(path: str, value: Any) -> dict[str, Any]:
    spec = minimal_spec()
    if path.startswith("job.configMapRef"):
        spec["job"] = {"configMapRef": {"name": "cm"}}
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = copy.deepcopy(value)
    return spec


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_a_bad_custom_resource_field_is_refused_by_the_crd_and_named_by_the_operator(case: str) -> None:
    path, value = SPEC_CASES[case]
    spec = _with(path, value)
    problems = validate(spec)
    named = f"spec.{path}[0]" if case.endswith(":pattern") and isinstance(value, list) else f"spec.{path}"
    assert any(p.startswith(f"{named}:") for p in problems), problems
    errors = schema_errors({"apiVersion": "dlmoe.io/v1alpha1", "kind": "DiffusionTrainingJob", "spec": spec})
    parent, _, leaf = f"spec.{path}".rpartition(".")
    assert any(e.startswith(f"spec.{path}") or (e.startswith(f"{parent}:") and f"'{leaf}'" in e)
               for e in errors), errors


# -- the dashboard's URLs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    from dlmoe.monitor.dashboard import Dashboard
    from dlmoe.monitor.store import Store
    from tests.synthetic_runs import balanced_counts, log_run

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return Dashboard(Store(uri), imbalance_threshold=2.0), log_run(uri, "known", balanced_counts())


URLS: dict[str, tuple[str, HTTPStatus, str]] = {
    "unknown-run-page": ("/runs/" + "0" * 32, HTTPStatus.NOT_FOUND, "0" * 32),
    "malformed-run-id": ("/runs/not-a-run-id", HTTPStatus.NOT_FOUND, "not-a-run-id"),
    "unknown-run-state": ("/api/runs/" + "0" * 32 + "/state", HTTPStatus.NOT_FOUND, "0" * 32),
    "unlogged-step": ("/api/runs/{run}/expert-load/11", HTTPStatus.NOT_FOUND, "11"),
    "unknown-page": ("/no/such/page", HTTPStatus.NOT_FOUND, "/no/such/page"),
    "static-escape": ("/static/../store.py", HTTPStatus.NOT_FOUND, ""),
    "missing-asset": ("/static/nothing.js", HTTPStatus.NOT_FOUND, ""),
}


@pytest.mark.parametrize("name", sorted(URLS))
def test_a_bad_dashboard_url_is_a_page_that_says_so(name: str, dashboard: tuple[Any, str]) -> None:
    app, run_id = dashboard
    path, status, named = URLS[name]
    got, _, body = app.respond(path.format(run=run_id))
    text = body.decode()
    assert got == status and "Traceback" not in text
    assert named in text


def test_a_step_that_is_not_a_number_shows_the_newest_step(dashboard: tuple[Any, str]) -> None:
    app, run_id = dashboard
    got, _, body = app.respond(f"/runs/{run_id}?step=abc")
    assert got == HTTPStatus.OK and 'data-testid="step-label">30<' in body.decode()


def test_the_cases_are_at_least_forty() -> None:
    assert len(CLI_CASES) + len(ALONE) + len(SPEC_CASES) + len(URLS) >= 40
