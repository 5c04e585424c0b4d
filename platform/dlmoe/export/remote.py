"""Model folders at any URI (a local path or ``s3://``): what ``model.init_from`` reads to start training from a
release-format folder — the official release or one of our exports — and how its weights are loaded."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from dlmoe.errors import ExportError
from dlmoe.export.hf import CONFIG_FILE, DLMOE_FILE, config_from_hf, read_state
from dlmoe.model import DiffusionMoE, ModelConfig


@contextlib.contextmanager
def local_folder(uri: str, endpoint_url: str | None = None) -> Iterator[Path]:
    """The folder ``uri`` on this machine: a local folder as it is, an ``s3://`` one downloaded for the duration."""
    from data_pipeline import storage

    where = storage.resolve(uri, endpoint_url=endpoint_url)
    if not where.is_s3:
        yield Path(where.path)
        return
    files = storage.list_files(where) if storage.exists(where) else []
    if not files:
        raise ExportError(f"model folder {uri} holds no files")
    with tempfile.TemporaryDirectory(prefix="dlmoe-model-") as tmp:
        root = where.path.rstrip("/")
        for location, _ in files:
            local = Path(tmp) / location.path[len(root) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(storage.read_bytes(location))
        yield Path(tmp)


def folder_config(uri: str, endpoint_url: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` of the folder at ``uri``, from its config.json and dlmoe.json alone (no weights read)."""
    from data_pipeline import storage

    where = storage.resolve(uri, endpoint_url=endpoint_url)
    config_file = where.child(CONFIG_FILE)
    if not storage.exists(config_file):
        raise ExportError(f"{uri} is not a model folder: it has no {CONFIG_FILE}")
    facts_file = where.child(DLMOE_FILE)
    facts = json.loads(storage.read_bytes(facts_file)) if storage.exists(facts_file) else {}
    mask = facts.get("mask_token_id")
    return config_from_hf(json.loads(storage.read_bytes(config_file)), config_file.uri,
                          None if mask is None else int(mask))


def config_differences(job: ModelConfig, folder: ModelConfig) -> list[str]:
    """The model fields on which a job and a folder disagree, each with both values."""
    return [f"{name} (job {getattr(job, name)!r}, folder {getattr(folder, name)!r})"
            for name in job.__dataclass_fields__ if getattr(job, name) != getattr(folder, name)]


def load_weights(model: DiffusionMoE, uri: str, endpoint_url: str | None = None) -> None:
    """Load the weights of the release-format folder at ``uri`` into a freshly built (whole, not yet expert-parallel)
    model; the parallelize step then gives each rank its experts, whatever the expert-parallel size."""
    with local_folder(uri, endpoint_url) as folder:
        state = read_state(folder, model.config)
    with torch.no_grad():
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
