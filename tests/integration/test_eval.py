"""dlmoe eval against a real ``mlflow server``: the results land in the run the exported folder came from (found by
its ``source_run``), or in the run given by ``--run-id``; an unknown run id is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.cli import main
from dlmoe.export import save_pretrained
from dlmoe.model import build_model, get_flavor
from dlmoe.tracking import RUN_NAME_TAG

DECODE = ["--gen-length", "8", "--block-length", "8", "--threshold", "0.9", "--no-progress"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An untrained model exported as if by the training run 'eval-run' at step 42, with a byte tokenizer."""
    return save_pretrained(build_model(get_flavor("debug"), seed=0), tmp_path / "model", tokenizer=byte_tokenizer(),
                           flavor="debug", step=42, source_run="eval-run")


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A quick-check JSONL and a one-task lm_eval folder (multiple choice over a local JSON file)."""
    jsonl = tmp_path / "quick.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w}) + "\n" for w in ("abc", "cab", "bca")))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.json").write_text("".join(json.dumps({"q": f"{w}=", "choices": [w, w[::-1]], "label": 0}) + "\n"
                                             for w in ("abcd", "dcab")))
    (tasks / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.json'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    return jsonl, tasks


def test_results_land_in_the_run_of_the_checkpoint(mlflow_server: str, folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("eval-it")
    run_id = client.create_run(experiment, run_name="eval-run", tags={RUN_NAME_TAG: "eval-run"}).info.run_id
    client.create_run(experiment, run_name="other", tags={RUN_NAME_TAG: "other"})
    jsonl, tasks = _inputs(tmp_path)
    out = tmp_path / "results.json"

    assert main(["eval", str(folder), "--tasks", "quick,tiny_choice", "--jsonl", str(jsonl), "--include-path",
                 str(tasks), "--mc-samples", "4", "--tracking-uri", mlflow_server, "--output-json", str(out),
                 *DECODE]) == 0

    document = json.loads(out.read_text())
    assert set(document["tasks"]) == {"quick", "tiny_choice"}
    assert document["tasks"]["quick"]["items"] == 3.0 and "acc" in document["tasks"]["tiny_choice"]
    run = client.get_run(run_id)
    expected = {f"eval/{task}/{metric}": value for task, metrics in document["tasks"].items()
                for metric, value in metrics.items()}
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")} == expected
    history = client.get_metric_history(run_id, "eval/tiny_choice/acc")
    assert [m.step for m in history] == [42]
    artifacts = [a.path for a in client.list_artifacts(run_id, "eval")]
    assert len(artifacts) == 1 and artifacts[0].startswith("eval/results-") and artifacts[0].endswith(".json")
    logged = json.loads(Path(client.download_artifacts(run_id, artifacts[0], str(tmp_path))).read_text())
    assert logged["tasks"] == document["tasks"] and logged["quick"]["items"] == document["quick"]["items"]
    assert logged["lm_eval"]["results"]["tiny_choice"]["acc,none"] == document["tasks"]["tiny_choice"]["acc"]


def test_run_id_wins_and_an_unknown_one_is_refused(mlflow_server: str, folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("eval-it-run-id")
    chosen = client.create_run(experiment, run_name="chosen").info.run_id
    jsonl, _ = _inputs(tmp_path)
    args = ["eval", str(folder), "--tasks", "quick", "--jsonl", str(jsonl), "--limit", "2",
            "--tracking-uri", mlflow_server, *DECODE]
    assert main([*args, "--run-id", chosen]) == 0
    assert client.get_run(chosen).data.metrics["eval/quick/items"] == 2.0
    assert "logged to MLflow run " + chosen in capsys.readouterr().err

    missing = "0123456789abcdef0123456789abcdef"
    assert main([*args, "--run-id", missing]) == 2
    err = capsys.readouterr().err
    assert f"dlmoe: error: cannot find run {missing} at MLflow {mlflow_server}" in err
