"""A saved model folder, loaded once for every task of an evaluation: the model, its tokenizer and its facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from dlmoe.errors import DataError, ExportError
from dlmoe.export import load_pretrained, read_dlmoe_facts
from dlmoe.model import DiffusionMoE


@dataclass
class LoadedModel:
    """A model in eval mode with the tokenizer saved next to it and the facts of its ``dlmoe.json``."""

    model: DiffusionMoE
    tokenizer: Tokenizer
    folder: Path
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def mask_id(self) -> int:
        return int(self.model.config.mask_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.model.config.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.model.config.pad_token_id)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def step(self) -> int | None:
        step = self.facts.get("step")
        return int(step) if step is not None else None

    @property
    def source_run(self) -> str | None:
        """The training run (``run_name``) the folder was exported from, when dlmoe wrote it."""
        run = self.facts.get("source_run")
        return str(run) if run else None


def load_for_eval(model_dir: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Load a folder written by ``dlmoe export`` / ``save_pretrained`` (or a release folder) with its tokenizer.

    Every evaluation task reads and writes text, so a folder without ``tokenizer.json`` is refused up front rather
    than after the weights are loaded."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a model folder: it has no config.json (expected a folder written by "
                          f"dlmoe export or save_pretrained)")
    if not (folder / TOKENIZER_FILE).is_file():
        raise DataError(f"model folder {folder} has no {TOKENIZER_FILE}: evaluation tasks are text and need the "
                        f"tokenizer saved with the model")
    model = load_pretrained(folder, device=device).eval()
    config = model.config
    tokenizer = load_tokenizer(folder, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                               mask_id=config.mask_token_id)
    return LoadedModel(model=model, tokenizer=tokenizer, folder=folder, facts=read_dlmoe_facts(folder))
