"""Evaluation of saved models: the lm-evaluation-harness adapter, the built-in quick check and the held-out ELBO.

Lives here: loading a saved model folder with its tokenizer for evaluation (loading.py); the JSONL quick check —
prompt/answer pairs decoded by the sampler and scored by exact match, no downloads (quick.py); the held-out ELBO
of a tokenized dataset in bits per token and per byte (elbo.py); the ``lm_eval``
adapter ``DlmoeLM``, registered with lm-evaluation-harness as the model ``dlmoe`` (harness.py, which imports
``lm_eval``: the optional ``eval`` extra, imported only when an lm_eval task is asked for); running a list of tasks
and logging the results into the MLflow run of the checkpoint (runner.py).

May import: torch, ``dlmoe.model``, ``dlmoe.diffusion``, ``dlmoe.export``, ``data_pipeline.tokenizers``,
``data_pipeline.shards`` (elbo.py, to read a held-out dataset), ``lm_eval`` (harness.py and runner.py only),
mlflow and ``dlmoe.tracking`` (runner.py only) — never ray, deepspeed or ``dlmoe.train``.
"""

from dlmoe.evaluation.loading import LoadedModel, load_for_eval
from dlmoe.evaluation.quick import QuickItem, QuickResult, read_pairs, run_quick_check

__all__ = ["LoadedModel", "QuickItem", "QuickResult", "load_for_eval", "read_pairs", "run_quick_check"]
