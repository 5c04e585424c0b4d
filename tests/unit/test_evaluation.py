"""dlmoe eval on the model trained on the copy language: the JSONL quick check, the lm-evaluation-harness adapter
driving small local tasks end to end with the network refused, and the errors for bad input."""

from __future__ import annotations

import ast
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from data_pipeline.tokenizers import byte_tokenizer
from dlmoe.cli import main
from dlmoe.diffusion import GenerationSettings
from dlmoe.errors import DataError
from dlmoe.evaluation import load_for_eval, read_pairs, run_quick_check
from dlmoe.evaluation.runner import EvalRequest, EvaluationError, check_tasks, metric_names
from dlmoe.export import save_pretrained
from dlmoe.model import DiffusionMoE, build_model, get_flavor
from dlmoe.train.copy_task import LETTERS

from .conftest import TASK

# The answer span of the copy language: the word, then EOS to the end; threshold decoding needs a few passes.
DECODE = GenerationSettings(gen_length=TASK.answer_length, block_length=TASK.answer_length, threshold=0.9)


def _text(ids: list[int]) -> str:
    return bytes(ids).decode()


def _near_miss(word: str, position: int) -> str:
    """The word with one letter replaced by the next letter of the alphabet."""
    letters = LETTERS.decode()
    return word[:position] + letters[(letters.index(word[position]) + 1) % len(letters)] + word[position + 1:]


def _examples(count: int, seed: int) -> list[tuple[str, str]]:
    prompts, answers = TASK.sample(count, torch.Generator().manual_seed(seed))
    return [(_text(p), _text(a)) for p, a in zip(prompts, answers, strict=True)]


@pytest.fixture(scope="module")
def copy_folder(copy_model: DiffusionMoE, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(copy_model, tmp_path_factory.mktemp("eval") / "copy", tokenizer=byte_tokenizer(),
                           flavor="debug", step=300, source_run="copy-run")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Hugging Face offline mode, and every connection that leaves this machine refused and recorded."""
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the variables once, at import; their module constants are what later calls consult.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts: list[Any] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if self.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network access refused in this test: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts


def test_quick_check_scores_exact_matches_on_the_copy_model(copy_folder: Path, tmp_path: Path) -> None:
    pairs = _examples(12, seed=101)
    wrong_prompt, wrong_answer = pairs[0][0], _near_miss(pairs[0][1], 0)
    lines = [json.dumps({"prompt": p, "answer": f"  {a}\n"}) for p, a in pairs]
    lines.insert(3, "")
    lines.append(json.dumps({"prompt": wrong_prompt, "answer": wrong_answer}))
    jsonl = tmp_path / "copy.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")

    loaded = load_for_eval(copy_folder)
    assert (loaded.step, loaded.source_run) == (300, "copy-run")
    result = run_quick_check(loaded, read_pairs(jsonl), DECODE, batch_size=5, progress=False)

    assert len(result.items) == 13
    assert [item.index for item in result.items] == list(range(13))
    assert sum(item.correct for item in result.items[:12]) >= 11, [i for i in result.items if not i.correct]
    for item, (prompt, answer) in zip(result.items[:12], pairs, strict=True):
        assert item.prompt == prompt
        assert item.correct == (item.generated.strip() == answer)
    last = result.items[-1]
    assert last.generated.strip() == pairs[0][1] and not last.correct  # the model is right, the expectation is not
    assert result.accuracy == pytest.approx(sum(i.correct for i in result.items) / 13)
    assert read_pairs(jsonl, limit=4) == [(p, f"  {a}\n") for p, a in pairs[:4]]


def _write_tasks(folder: Path, seed: int) -> None:
    """Four lm_eval tasks over local JSON files: multiple choice, greedy checks both ways, and generation."""
    docs = []
    for prompt, word in _examples(6, seed):
        # The copy language's whole answer span: the word, then EOS to the end of the training row (a sequence of
        # the length the model was trained on; greedy decoding of a shorter one is off its training distribution,
        # and so is the ELBO of a bare word: the choices carry the padding too).
        padding = "<|eos|>" * (TASK.seq_len - len(prompt) - len(word))
        docs.append({"prompt": prompt, "word": word, "span": word + padding, "miss": _near_miss(word, 5) + padding,
                     "choices": [choice + padding for choice in (_near_miss(word, 2), word, _near_miss(word, 7),
                                                                  word[::-1])], "label": 1})
    data = folder / "copy.json"
    data.write_text("\n".join(json.dumps(doc) for doc in docs) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              f"doc_to_text: \"{{{{prompt}}}}\"\ntarget_delimiter: \"\"\n")
    (folder / "copy_choice.yaml").write_text(
        f"task: copy_choice\n{common}output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    for name, target in (("copy_greedy", "span"), ("copy_not_greedy", "miss")):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\n{common}output_type: loglikelihood\ndoc_to_target: \"{{{{{target}}}}}\"\n"
            "metric_list:\n  - metric: acc\n  - metric: perplexity\n")
    (folder / "copy_generate.yaml").write_text(
        f"task: copy_generate\n{common}output_type: generate_until\ndoc_to_target: \"{{{{word}}}}\"\n"
        "generation_kwargs:\n  until: [\"=\"]\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_runs_local_tasks_end_to_end_without_network(copy_folder: Path, tmp_path: Path,
                                                              no_network: list[Any]) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dlmoe.evaluation.harness  # noqa: F401  (registers the model "dlmoe" with lm_eval)

    # Registering ours must not hide lm_eval's own models (its registry loads them only while it is empty).
    assert {"dlmoe", "hf"} <= set(lm_eval.api.registry.model_registry.keys())
    _write_tasks(tmp_path, seed=202)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.warns(UserWarning, match=r"\['do_sample'\].*ignored"):
        results = lm_eval.simple_evaluate(
            model="dlmoe", model_args={"pretrained": str(copy_folder), "mc_samples": 16, "mc_batch_size": 16,
                                       "gen_length": DECODE.gen_length, "block_length": DECODE.block_length,
                                       "threshold": DECODE.threshold, "progress": False},
            tasks=["copy_choice", "copy_greedy", "copy_not_greedy", "copy_generate"], task_manager=manager,
            log_samples=False, bootstrap_iters=0)
    assert results is not None
    scores = results["results"]
    assert scores["copy_choice"]["acc,none"] == 1.0        # the ELBO ranks the true word above three wrong ones
    assert scores["copy_greedy"]["acc,none"] == 1.0        # greedy decoding reproduces the true word ...
    assert scores["copy_not_greedy"]["acc,none"] == 0.0    # ... and never a near miss
    assert scores["copy_greedy"]["perplexity,none"] < scores["copy_not_greedy"]["perplexity,none"]
    assert scores["copy_generate"]["exact_match,none"] >= 5 / 6
    assert results["config"]["source_run"] == "copy-run" and results["config"]["mc_samples"] == 16
    assert no_network == []


def test_generation_honours_until_and_max_gen_toks(copy_folder: Path) -> None:
    from lm_eval.api.instance import Instance

    from dlmoe.evaluation.harness import DlmoeLM

    lm = DlmoeLM(str(copy_folder), gen_length=DECODE.gen_length, block_length=DECODE.block_length,
                 threshold=DECODE.threshold, batch_size=2, progress=False)
    (prompt, word), (prompt2, word2) = _examples(2, seed=303)
    stop = word[3]
    requests = [Instance("generate_until", {}, (prompt, {"until": [stop]}), 0),
                Instance("generate_until", {}, (prompt2, {"until": ["zz"], "max_gen_toks": 5}), 1),
                Instance("generate_until", {}, (prompt, {"until": []}), 2)]
    out = lm.generate_until(requests)
    assert out == [word[:word.index(stop)], word2[:5], word]


def test_rolling_log_likelihood_prefers_the_copy_language(copy_folder: Path) -> None:
    from lm_eval.api.instance import Instance

    from dlmoe.evaluation.harness import DlmoeLM

    lm = DlmoeLM(str(copy_folder), mc_samples=32, mc_batch_size=32, progress=False)
    prompt, word = _examples(1, seed=404)[0]
    padding = "<|eos|>" * (TASK.seq_len - len(prompt) - len(word))
    texts = [prompt + word + padding, prompt + _near_miss(word, 4) + padding]
    true, wrong = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i)
                                            for i, text in enumerate(texts)])
    assert true < 0 and wrong < true


def test_unknown_task_names_the_available_ones(copy_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The real default index (lm_eval's own task YAMLs, read locally): a near miss of a known benchmark.
    code = main(["eval", str(copy_folder), "--tasks", "quick,gsm8kk", "--jsonl", "unused.jsonl"])
    err = capsys.readouterr().err
    assert code == 2
    assert "dlmoe: error: unknown task 'gsm8kk'" in err and "did you mean for 'gsm8kk': gsm8k" in err
    assert "tasks are available, among them: quick, " in err


def test_unknown_task_in_a_small_index_lists_every_name(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path, seed=1)
    request = EvalRequest(tasks=["copy_chioce"], generation=DECODE)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(EvaluationError) as caught:
        check_tasks(request, manager)
    message = str(caught.value)
    assert "unknown task 'copy_chioce'" in message and "did you mean for 'copy_chioce': copy_choice" in message
    assert ("available tasks: quick, copy_choice, copy_generate, copy_greedy, copy_not_greedy" in message)


@pytest.mark.parametrize(("tasks", "jsonl", "match"), [
    (["quick"], None, "reads prompt/answer pairs from --jsonl"),
    (["copy_choice"], "x.jsonl", "--jsonl is read by the task 'quick' only"),
    ([], None, "no tasks given"),
])
def test_inconsistent_task_options_are_refused(tasks: list[str], jsonl: str | None, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        check_tasks(EvalRequest(tasks=tasks, generation=DECODE, jsonl=jsonl))


@pytest.mark.parametrize(("line", "match"), [
    ('{"prompt": "a", "answer": ', r"bad\.jsonl:3: not valid JSON"),
    ('["a", "b"]', r"bad\.jsonl:3: expected an object"),
    ('{"prompt": "a"}', r"bad\.jsonl:3: field 'answer' must be a string, it is missing"),
    ('{"prompt": 7, "answer": "b"}', r"bad\.jsonl:3: field 'prompt' must be a string, it is a int"),
])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        read_pairs(path)


def test_a_model_folder_without_tokenizer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_pretrained(build_model(get_flavor("debug"), seed=0), tmp_path / "bare")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    assert main(["eval", str(folder), "--tasks", "quick", "--jsonl", str(jsonl)]) == 2
    assert f"model folder {folder} has no tokenizer.json" in capsys.readouterr().err


def test_cli_quick_check_writes_the_results_document(copy_folder: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no ./mlflow.db here: nothing to log into, and none may be created
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pairs = _examples(4, seed=505)
    jsonl = tmp_path / "copy.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    out = tmp_path / "results.json"
    assert main(["eval", str(copy_folder), "--tasks", "quick", "--jsonl", str(jsonl), "--limit", "3",
                 "--gen-length", "24", "--block-length", "24", "--threshold", "0.9", "--output-json", str(out),
                 "--no-progress"]) == 0
    document = json.loads(out.read_text())
    items = document["quick"]["items"]
    assert [item["prompt"] for item in items] == [p for p, _ in pairs[:3]]
    accuracy = sum(item["correct"] for item in items) / 3
    assert document["tasks"]["quick"] == {"exact_match": accuracy, "items": 3}
    printed = capsys.readouterr().out.splitlines()
    assert f"{'quick':<24} {'items':<28} 3" in printed  # a count, not 3.0000
    assert f"{'quick':<24} {'exact_match':<28} {accuracy:.4f}" in printed
    assert accuracy >= 2 / 3
    assert document["settings"]["threshold"] == 0.9 and document["model"]["step"] == 300
    assert metric_names(document) == {"eval/quick/exact_match": accuracy, "eval/quick/items": 3.0}
    assert not (tmp_path / "mlflow.db").exists()


def test_evaluation_imports_what_its_docstring_allows() -> None:
    import dlmoe.evaluation

    folder = Path(dlmoe.evaluation.__file__).parent
    allowed_only_in = {"lm_eval": {"harness.py", "runner.py"}, "mlflow": {"runner.py"},
                       "dlmoe.tracking": {"runner.py"}}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        for module in modules:
            assert module.split(".")[0] not in ("ray", "deepspeed") and not module.startswith("dlmoe.train"), \
                f"{path.name} imports {module}"
            for prefix, files in allowed_only_in.items():
                if module == prefix or module.startswith(f"{prefix}."):
                    assert path.name in files, f"{path.name} imports {module}"


def test_long_contexts_are_cut_from_the_left_and_long_continuations_refused() -> None:
    from lm_eval.api.instance import Instance

    from dlmoe.errors import ModelInputError
    from dlmoe.evaluation import LoadedModel
    from dlmoe.evaluation.harness import DlmoeLM

    model = build_model(get_flavor("debug"), seed=0).eval()
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), folder=Path("in-memory"))
    lm = DlmoeLM(loaded, mc_samples=4, mc_batch_size=4, check_greedy=False, progress=False)
    window = model.config.max_position_embeddings
    context = "".join(chr(ord("a") + i % 26) for i in range(window + 50))
    with pytest.warns(UserWarning, match=f"cut from the left to fit the model's {window} positions"):
        [(score, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, "xy"), 0)])
    kept = list(context.encode())[-(window - 2):]
    assert score == lm._score(kept, list(b"xy")) and greedy is False
    with pytest.raises(ModelInputError, match=f"request 0 .*{window + 1} tokens, more than the model's context"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("q", "z" * (window + 1)), 0)])
