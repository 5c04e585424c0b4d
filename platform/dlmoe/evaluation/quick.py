"""The built-in quick check: prompt/answer pairs from a local JSONL, decoded by the sampler, scored by exact match.

One JSON object per line, ``{"prompt": "...", "answer": "..."}`` (blank lines are skipped). A generated answer
counts when it equals the expected one after stripping surrounding whitespace on both. Nothing is downloaded: this
is the check to run on a fresh export, offline, before the lm-evaluation-harness benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipeline.jsonl import jsonl_records
from dlmoe.diffusion import GenerationSettings, generate
from dlmoe.errors import DataError
from dlmoe.evaluation.loading import LoadedModel


@dataclass(frozen=True)
class QuickItem:
    """One scored pair: what was asked, what was expected, what the model answered."""

    index: int
    prompt: str
    answer: str
    generated: str
    correct: bool


@dataclass
class QuickResult:
    items: list[QuickItem]
    forward_passes: int

    @property
    def accuracy(self) -> float:
        return sum(item.correct for item in self.items) / len(self.items)

    def metrics(self) -> dict[str, float]:
        return {"exact_match": self.accuracy, "items": len(self.items)}  # a count: printed as one

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics(), "forward_passes": self.forward_passes,
                "items": [asdict(item) for item in self.items]}


def read_pairs(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of a JSONL file, the first ``limit`` of them when given; a bad line is named by
    file and line number."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"quick-check file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read quick-check file {file}: {exc}") from exc
    pairs: list[tuple[str, str]] = []
    for at, record in jsonl_records(text, str(file)):
        if not isinstance(record, dict):
            raise DataError(f"{at}: expected an object {{\"prompt\": ..., \"answer\": ...}}, got "
                            f"{type(record).__name__}")
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str):
                found = "missing" if key not in record else f"a {type(record[key]).__name__}"
                raise DataError(f"{at}: field '{key}' must be a string, it is {found}")
        pairs.append((record["prompt"], record["answer"]))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"quick-check file {file} holds no prompt/answer pairs")
    return pairs


def run_quick_check(loaded: LoadedModel, pairs: Sequence[tuple[str, str]], settings: GenerationSettings, *,
                    batch_size: int = 8, progress: bool = True) -> QuickResult:
    """Decode an answer for every prompt (``batch_size`` prompts per sampler call) and score exact matches."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    tokenizer = loaded.tokenizer
    items: list[QuickItem] = []
    passes = 0
    with tqdm(total=len(pairs), desc="quick check", unit="item", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            result = generate(loaded.model, [tokenizer.encode(prompt) for prompt, _ in chunk], settings,
                              mask_id=loaded.mask_id, eos_id=loaded.eos_id, pad_id=loaded.pad_id)
            passes += result.forward_passes
            for offset, ((prompt, answer), ids) in enumerate(zip(chunk, result.answers, strict=True)):
                text = tokenizer.decode(ids)
                items.append(QuickItem(index=start + offset, prompt=prompt, answer=answer, generated=text,
                                       correct=text.strip() == answer.strip()))
            bar.update(len(chunk))
    return QuickResult(items=items, forward_passes=passes)
