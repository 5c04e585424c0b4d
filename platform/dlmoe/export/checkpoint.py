"""A training checkpoint → the release's Hugging Face folder, for any expert-parallel size and ZeRO stage 0–2.

A checkpoint, in the format ``dlmoe.checkpointing`` defines, holds ``dlmoe_state.json`` (step, the run, and the model
config it was made with), every rank's checksum list of its files, and DeepSpeed's files under the tag folder
``dlmoe/``. Two kinds of DeepSpeed file carry the weights; the optimizer files are not needed:

- ``mp_rank_00_model_states.pt``: its ``module`` is every parameter that is not an expert of an expert-parallel
  layer, whole (under ZeRO 0–2 each rank's copy is the full one). With ``ep_size`` 1 that includes the fused
  experts; under AutoEP a layer's router is ``mlp.layer.router.gate.weight``.
- ``layer_{k}_expert_{e}_mp_rank_00_model_states.pt`` (expert parallelism): expert ``e`` (global index) of the k-th
  MoE layer as AutoEP's ``model.layers.{i}.mlp.layer.experts.w1.{e}`` (gate, [I, D]), ``w3.{e}`` (up) and
  ``w2.{e}`` (down, [D, I]) — whichever rank held it. DeepSpeed's ``zero_to_fp32`` leaves these files out.

Given a run, the exporter takes its newest checkpoint whose model files verify (a broken one is passed over with a
warning). It writes the folder shard by shard — an expert file is read when its shard is written, so memory holds
the non-expert weights and one shard. Every model file is checked against the checksum lists first (xxHash3,
a fraction of the reading), so nothing is unpickled from a file that does not match and every file behind
the folder has matched before it is published. A local folder is staged and moved into place;
an ``s3://`` folder is staged locally and uploaded with ``config.json`` last (removed first when a previous export
is overwritten), so a folder without ``config.json`` is never a finished one.
"""

from __future__ import annotations

import collections
import io
import json
import mmap
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline import storage
from data_pipeline.tokenizers import byte_tokenizer, load_tokenizer
from dlmoe.checkpointing import CHECKSUM_FILE, STATE_FILE, TAG, CheckpointState, checksum_matches, find_checkpoints
from dlmoe.errors import CheckpointError, ExportError
from dlmoe.export.hf import to_hf
from dlmoe.export.writer import tensor_bytes, write_folder, write_to_uri
from dlmoe.model import ModelConfig

MODEL_STATES = f"{TAG}/mp_rank_00_model_states.pt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExportResult:
    uri: str
    checkpoint: str
    step: int
    tensors: int
    bytes: int


def checkpoint_candidates(source: str, endpoint_url: str | None = None) -> tuple[list[Any], bool]:
    """The checkpoints ``source`` names, newest first, and whether it named a run: a checkpoint folder (it has
    ``dlmoe_state.json``) names itself; a run folder (``{checkpoint.storage}/{run_name}``) names its checkpoints."""
    where = storage.resolve(source, endpoint_url=endpoint_url)
    if storage.exists(where.child(STATE_FILE)):
        return [where], False
    if not storage.exists(where):
        raise ExportError(f"{source} does not exist")
    candidates = [found.location for found in find_checkpoints(where)]
    if not candidates:
        raise ExportError(f"{source} is neither a checkpoint (no {STATE_FILE}) nor a run folder with checkpoints")
    return candidates, True


def _expected_files(state: CheckpointState, config: ModelConfig) -> list[str]:
    files = [MODEL_STATES]
    if state.ep_size > 1:
        moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        files += [f"{TAG}/layer_{k}_expert_{e}_mp_rank_00_model_states.pt"
                  for k in range(len(moe_layers)) for e in range(config.num_experts)]
    return files


def _state_and_config(state_bytes: bytes, where: str) -> tuple[CheckpointState, ModelConfig]:
    try:
        state = CheckpointState.from_json(state_bytes, f"{where}/{STATE_FILE}")
        return state, state.model_config(f"{where}/{STATE_FILE}")
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc


@dataclass
class _Fetched:
    """A checkpoint's model files in a local folder, and their checksums."""

    folder: Path
    state: CheckpointState
    config: ModelConfig
    uri: str
    sums: dict[str, str]

    def verify(self) -> None:
        """Check every model file against its checksum; ``ExportError`` names those that do not match."""
        mismatched = [name for name in sorted(self.sums) if not checksum_matches(self.folder / name, self.sums[name])]
        if mismatched:
            raise ExportError(f"checkpoint {self.uri}: {', '.join(mismatched)} "
                              f"{'does' if len(mismatched) == 1 else 'do'} not match the checksum list (corrupt or "
                              f"changed)")


def _fetch(checkpoint: Any, local: Path) -> _Fetched:
    """The checkpoint's model files in a local folder (``local`` for S3; the checkpoint itself when it is local)
    and their checksums."""
    state, config = _state_and_config(storage.read_bytes(checkpoint.child(STATE_FILE)), checkpoint.uri)
    sums: dict[str, str] = {}
    present = set()
    for path, _ in storage.list_files(checkpoint, ()):
        name = path.path[len(checkpoint.path.rstrip("/")) + 1:]
        present.add(name)
        if name.startswith(f"{CHECKSUM_FILE}.rank"):
            sums.update(json.loads(storage.read_bytes(path)))
    folder = local if checkpoint.is_s3 else Path(checkpoint.path)
    needed = _expected_files(state, config)
    missing = [name for name in needed if name not in present or name not in sums]
    if missing:
        raise ExportError(f"checkpoint {checkpoint.uri} lacks {len(missing)} model file(s) (absent, or in no "
                          f"checksum list): {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    for name in needed:
        if checkpoint.is_s3:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(storage.read_bytes(checkpoint.child(name)))
    fetched = _Fetched(folder, state, config, checkpoint.uri, {name: sums[name] for name in needed})
    fetched.verify()  # before anything is unpickled from them
    return fetched


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64}


class _NotPlainTensors(Exception):
    """A ``torch.save`` file holding more than a flat dict of tensors: ``torch.load`` reads it instead."""


class _TensorDictUnpickler(pickle.Unpickler):
    """Reads the pickle of a ``torch.save`` file that holds a flat dict of CPU tensors — what DeepSpeed writes for
    each expert — with every tensor a view of the memory-mapped file. It knows only the four globals such a pickle
    names (so it never runs code from the file) and does none of ``torch.load``'s per-tensor bookkeeping, most of
    the cost of reading many small expert files (BENCHMARKS.md, Export)."""

    def __init__(self, path: Path) -> None:
        self.reader = torch._C.PyTorchFileReader(str(path))
        super().__init__(io.BytesIO(self.reader.get_record("data.pkl")))
        with path.open("rb") as handle:
            self.mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach it

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise _NotPlainTensors(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, dtype, key, location, numel = pid
        if kind != "storage" or location != "cpu" or not isinstance(dtype, torch.dtype):
            raise _NotPlainTensors(str(pid))
        offset = self.reader.get_record_offset(f"data/{key}")  # type: ignore[attr-defined]  # (not in the stubs)
        return torch.frombuffer(self.mapped, dtype=dtype, count=numel, offset=offset)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    requires_grad: bool, hooks: Any, *metadata: Any) -> torch.Tensor:
    if hooks or metadata or requires_grad:
        raise _NotPlainTensors("a tensor with hooks, metadata or requires_grad")
    return storage.as_strided(size, stride, offset)


def read_tensor_dict(path: Path) -> dict[str, Any]:
    """A ``torch.save`` file, memory-mapped: by ``_TensorDictUnpickler`` when it is a flat dict of CPU tensors,
    else (other content, e.g. from another DeepSpeed version) by ``torch.load``."""
    try:
        loaded = _TensorDictUnpickler(path).load()
    except _NotPlainTensors:
        loaded = None
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    return _torch_load(path)


def _torch_load(path: Path) -> dict[str, Any]:
    """Any DeepSpeed checkpoint file, memory-mapped (its tensors are read only where they are used)."""
    result: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return result


EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
AUTOEP_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class _Tensors:
    """Release-keyed tensors of one checkpoint, read as shards ask for them."""

    def __init__(self, fetched: _Fetched) -> None:
        self.folder, self.config = fetched.folder, fetched.config
        self.expert_parallel = fetched.state.ep_size > 1
        # Memory-mapped: under ZeRO-0 this file also holds the optimizer state, which is never read.
        module = self._load(MODEL_STATES)["module"]
        module = {k.replace(".mlp.layer.router.gate.", ".mlp.gate."): v for k, v in module.items()}
        self.plain = module if self.expert_parallel else to_hf(module, self.config)
        self.moe_index = {i: k for k, i in enumerate(i for i in range(self.config.num_hidden_layers)
                                                      if self.config.is_moe_layer(i))}
        self.cached: tuple[str, dict[str, torch.Tensor]] | None = None
        self.dtype = next(iter(module.values())).dtype

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            match = EXPERT_KEY.fullmatch(name) if self.expert_parallel else None
            if match is None:
                if name not in self.plain:
                    raise ExportError(f"{self.folder / MODEL_STATES} has no tensor for {name}")
                out[name] = self.plain[name]
                continue
            layer, expert, kind = int(match[1]), int(match[2]), match[3]
            path = f"{TAG}/layer_{self.moe_index[layer]}_expert_{expert}_mp_rank_00_model_states.pt"
            if self.cached is None or self.cached[0] != path:
                self.cached = (path, self._load(path))
            key = f"model.layers.{layer}.mlp.layer.experts.{AUTOEP_NAMES[kind]}.{expert}"
            if key not in self.cached[1]:
                raise ExportError(f"{self.folder / path} has no tensor {key}")
            out[name] = self.cached[1][key]
        return out

    def _load(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            # The non-expert file holds optimizer state and DeepSpeed's bookkeeping besides the weights.
            return _torch_load(path) if name == MODEL_STATES else read_tensor_dict(path)
        except Exception as exc:
            raise ExportError(f"cannot read {path}: {exc}") from exc


def export_checkpoint(source: str, out: str, *, dtype: str | None = None,
                      endpoint_url: str | None = None) -> ExportResult:
    """Export the checkpoint ``source`` names (see ``checkpoint_candidates``) to the folder ``out`` (local or s3://)."""
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    candidates, is_run = checkpoint_candidates(source, endpoint_url)
    target = storage.resolve(out, endpoint_url=endpoint_url)
    with tempfile.TemporaryDirectory(prefix="dlmoe-export-") as tmp:
        # A run's newest checkpoint whose model files verify; a named checkpoint must verify itself.
        for number, checkpoint in enumerate(candidates):
            try:
                fetched = _fetch(checkpoint, Path(tmp) / f"checkpoint-{number}")
                break
            except ExportError as exc:
                if not is_run:
                    raise
                warnings.warn(f"passing over a checkpoint that does not verify: {exc}", stacklevel=2)
        else:
            raise ExportError(f"no checkpoint of {source} verifies")
        weights = _write(fetched, target, dtype)  # past verification: its errors are the export's, not the source's
    nbytes = tensor_bytes(fetched.config, weights)
    return ExportResult(uri=target.uri, checkpoint=checkpoint.uri, step=fetched.state.step,
                        tensors=len(nbytes), bytes=sum(nbytes.values()))


def _write(fetched: _Fetched, target: Any, dtype: str | None) -> torch.dtype:
    """Write the verified checkpoint ``fetched`` as a release-format folder at ``target``; returns the weights'
    dtype."""
    state, config = fetched.state, fetched.config
    tensors = _Tensors(fetched)
    tokenizer_name = state.tokenizer
    tokenizer = byte_tokenizer() if tokenizer_name == "byte" else None
    if tokenizer is None and Path(tokenizer_name).exists():
        tokenizer = load_tokenizer(tokenizer_name, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                                   mask_id=config.mask_token_id)
    elif tokenizer is None:
        warnings.warn(f"the run's tokenizer {tokenizer_name} is not reachable here; exporting without tokenizer "
                      f"files", stacklevel=2)
    weights = DTYPES[dtype] if dtype else tensors.dtype
    facts = {"flavor": state.flavor, "step": state.step, "source_run": state.run_name,
             "source_checkpoint": fetched.uri, **({"training": state.recipe} if state.recipe else {})}
    write_to_uri(target, lambda out: write_folder(out, config, tensors, dtype=weights, tokenizer=tokenizer,
                                                  facts=facts))
    return weights
