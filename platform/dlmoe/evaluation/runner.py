"""``dlmoe eval``: run the quick check, the held-out ELBO and lm-evaluation-harness tasks on one loaded model, gather
one results document, and log it into the MLflow run of the checkpoint.

Task names are checked before anything runs: ``quick`` (the built-in JSONL check), ``elbo:URI`` (the held-out ELBO
of the tokenized dataset at URI, elbo.py) or a name lm_eval's task manager finds in its own task YAMLs (and
``include_path``) — a local index, so an unknown name is reported offline.
lm_eval tasks read their data sets through Hugging Face ``datasets`` (its cache, or the hub when online); the quick
check reads only the local JSONL.

The run to log into is ``run_id`` when given, else the MLflow run tagged with the folder's ``source_run`` (the
``run_name`` that dlmoe.json records for an export of a training run). Metrics are ``eval/<task>/<metric>`` at the
checkpoint's step; the whole results document is the artifact ``eval/results-<time>.json``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dlmoe.diffusion import GenerationSettings
from dlmoe.errors import DlmoeError
from dlmoe.evaluation.elbo import TASK_PREFIX as ELBO_PREFIX
from dlmoe.evaluation.elbo import dataset_elbo
from dlmoe.evaluation.loading import LoadedModel
from dlmoe.evaluation.quick import read_pairs, run_quick_check
from dlmoe.tracking import RUN_NAME_TAG

QUICK_TASK = "quick"
ELBO_TASK = "elbo"  # its metrics' name; the task is asked for as ELBO_PREFIX + a dataset URI


class EvaluationError(DlmoeError, ValueError):
    """Tasks, task files or tracking settings of an evaluation that cannot work."""


@dataclass
class EvalRequest:
    """What to evaluate and how (the command line's options)."""

    tasks: list[str]
    generation: GenerationSettings
    jsonl: str | None = None
    limit: int | None = None
    mc_samples: int = 64
    mc_batch_size: int = 32
    batch_size: int = 8
    num_fewshot: int | None = None
    include_path: str | None = None
    check_greedy: bool = True
    progress: bool = True


def _task_manager(include_path: str | None) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvaluationError(f"lm_eval tasks need the lm-evaluation-harness: pip install 'dlmoe[eval]' ({exc})") \
            from None
    return TaskManager(include_path=include_path)


def check_tasks(request: EvalRequest, manager: Any = None) -> Any:
    """Refuse unknown task names (naming the available ones) and inconsistent options; return lm_eval's task
    manager (``manager`` when given, else one over its own tasks and ``include_path``) when lm_eval tasks are asked
    for, else None."""
    if not request.tasks:
        raise EvaluationError("no tasks given: --tasks quick (with --jsonl), elbo:DATASET and/or lm_eval task names")
    if request.limit is not None and request.limit < 1:
        raise EvaluationError(f"--limit must be at least 1, got {request.limit}")
    if QUICK_TASK in request.tasks and request.jsonl is None:
        raise EvaluationError(f"task '{QUICK_TASK}' reads prompt/answer pairs from --jsonl PATH; none given")
    if request.jsonl is not None and QUICK_TASK not in request.tasks:
        raise EvaluationError(f"--jsonl is read by the task '{QUICK_TASK}' only; add it to --tasks")
    elbo = [task for task in request.tasks if task.startswith(ELBO_PREFIX)]
    if len(elbo) > 1:
        raise EvaluationError(f"one held-out dataset per evaluation: got {', '.join(elbo)}")
    if elbo:
        from data_pipeline.shards import read_manifest

        uri = elbo[0].removeprefix(ELBO_PREFIX)
        if not uri:
            raise EvaluationError(f"task '{elbo[0]}' names no dataset: {ELBO_PREFIX}URI, a tokenized held-out set "
                                  f"(e.g. the validation/ folder of dlmoe tokenize --validation-fraction)")
        read_manifest(uri)  # a DataError naming the URI when it is not a dataset
    others = _harness_tasks(request.tasks)
    if not others:
        return None
    manager = manager if manager is not None else _task_manager(request.include_path)
    known = set(manager.all_tasks)
    unknown = [task for task in others if task not in known]
    if unknown:
        raise EvaluationError(unknown_tasks_message(unknown, [QUICK_TASK, *manager.all_tasks]))
    return manager


def _harness_tasks(tasks: Sequence[str]) -> list[str]:
    return [task for task in tasks if task != QUICK_TASK and not task.startswith(ELBO_PREFIX)]


def unknown_tasks_message(unknown: Sequence[str], available: Sequence[str], shown: int = 60) -> str:
    """Name the unknown tasks, the close matches, and the available names (all of them when few)."""
    lines = [f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(repr(t) for t in unknown)}"]
    for task in unknown:
        close = difflib.get_close_matches(task, available, n=5, cutoff=0.6)
        if close:
            lines.append(f"  did you mean for '{task}': {', '.join(close)}")
    if len(available) <= shown:
        lines.append(f"  available tasks: {', '.join(available)}")
    else:
        lines.append(f"  {len(available)} tasks are available, among them: {', '.join(available[:shown])}, ... "
                     f"(dlmoe eval --list-tasks prints them all)")
    return "\n".join(lines)


def list_tasks(include_path: str | None = None) -> list[str]:
    """Every task name ``dlmoe eval`` accepts: the quick check, the held-out ELBO, then lm_eval's tasks, groups and
    tags."""
    ours = [QUICK_TASK, f"{ELBO_PREFIX}DATASET"]
    try:
        manager = _task_manager(include_path)
    except EvaluationError:
        return ours
    return [*ours, *manager.all_tasks]


def _json_ready(value: Any) -> Any:
    """lm_eval's results hold numpy scalars and sets; JSON needs plain values."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else
                                 sorted(o) if isinstance(o, set) else str(o)))


def run_evaluation(loaded: LoadedModel, request: EvalRequest, manager: Any = None) -> dict[str, Any]:
    """Run every task; returns ``{"model", "settings", "tasks": {task: {metric: value}}, "quick", "lm_eval"}``."""
    manager = manager if manager is not None else check_tasks(request)
    document: dict[str, Any] = {
        "model": {"dir": str(loaded.folder), "step": loaded.step, "source_run": loaded.source_run},
        "tasks": {}, "settings": {"limit": request.limit, "num_fewshot": request.num_fewshot,
                                  **asdict(request.generation)}}
    if QUICK_TASK in request.tasks:
        assert request.jsonl is not None
        pairs = read_pairs(request.jsonl, request.limit)
        quick = run_quick_check(loaded, pairs, request.generation, batch_size=request.batch_size,
                                progress=request.progress)
        document["quick"] = {"jsonl": request.jsonl, **quick.to_dict()}
        document["tasks"][QUICK_TASK] = quick.metrics()
    for task in request.tasks:
        if task.startswith(ELBO_PREFIX):
            uri = task.removeprefix(ELBO_PREFIX)
            result = dataset_elbo(loaded, uri, limit=request.limit, samples=request.mc_samples,
                                  batch_size=request.mc_batch_size, seed=request.generation.seed)
            document["elbo"] = {"dataset": uri, "seed": request.generation.seed, **result.metrics()}
            document["tasks"][ELBO_TASK] = result.metrics()
    others = _harness_tasks(request.tasks)
    if others:
        import lm_eval

        from dlmoe.evaluation.harness import DlmoeLM

        g = request.generation
        lm = DlmoeLM(loaded, batch_size=request.batch_size, mc_samples=request.mc_samples,
                     mc_batch_size=request.mc_batch_size, seed=g.seed, gen_length=g.gen_length,
                     block_length=g.block_length, steps=g.steps, threshold=g.threshold, temperature=g.temperature,
                     check_greedy=request.check_greedy, progress=request.progress)
        document["settings"].update(lm.settings())
        results = lm_eval.simple_evaluate(model=lm, tasks=others, task_manager=manager, limit=request.limit,
                                          num_fewshot=request.num_fewshot, log_samples=False,
                                          random_seed=g.seed, numpy_random_seed=g.seed, torch_random_seed=g.seed,
                                          fewshot_random_seed=g.seed)
        if results is None:
            raise EvaluationError("lm_eval returned no results (this process is not its rank 0)")
        kept = {key: results[key] for key in ("results", "groups", "versions", "n-shot", "higher_is_better",
                                              "n-samples") if key in results}
        document["lm_eval"] = _json_ready(kept)
        for task, metrics in document["lm_eval"].get("results", {}).items():
            document["tasks"][task] = numeric_metrics(metrics)
    return document


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """lm_eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` → ``{"acc": 0.5, "acc_stderr": 0.1}``;
    a metric under a named filter keeps it (``exact_match-strict-match``); non-numbers ("N/A") are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        name, _, filter_name = key.partition(",")
        out[name if filter_name in ("", "none") else f"{name}-{filter_name}"] = float(value)
    return out


def metric_names(document: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a results document: ``eval/<task>/<metric>``, with characters MLflow refuses
    replaced by ``_``."""
    return {re.sub(r"[^\w\-. /:]", "_", f"eval/{task}/{metric}"): value
            for task, metrics in document["tasks"].items() for metric, value in metrics.items()}


def find_run(tracking_uri: str, run_name: str) -> str | None:
    """The id of the newest MLflow run tagged with ``run_name`` in any experiment, or None."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              run_view_type=ViewType.ALL, order_by=["attributes.start_time DESC"], max_results=1)
    return str(runs[0].info.run_id) if runs else None


def resolve_run(tracking_uri: str, run_id: str | None, loaded: LoadedModel) -> str | None:
    """``run_id`` (checked to exist), else the run of the folder's ``source_run``, else None (not known)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        if run_id is not None:
            MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
            return run_id
        if loaded.source_run is None:
            return None
        return find_run(tracking_uri, loaded.source_run)
    except MlflowException as exc:
        what = f"run {run_id}" if run_id else f"the run of '{loaded.source_run}'"
        raise EvaluationError(f"cannot find {what} at MLflow {tracking_uri}: {exc.message}") from None


def log_results(tracking_uri: str, run_id: str, document: dict[str, Any]) -> str:
    """Log the metrics at the checkpoint's step (0 when unknown) and the document as an artifact; return the
    artifact's path in the run."""
    import tempfile

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    stamp = int(time.time() * 1000)
    step = document["model"]["step"] or 0
    metrics = [Metric(name, value, stamp, step) for name, value in metric_names(document).items()]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start:start + 500])
    name = f"results-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    with tempfile.TemporaryDirectory(prefix="dlmoe-eval-") as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(document, indent=2))
        client.log_artifact(run_id, str(path), artifact_path="eval")
    return f"eval/{name}"
