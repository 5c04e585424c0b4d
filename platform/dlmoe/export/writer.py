"""Writing model folders in the release's format: shard by shard from any source of release-keyed tensors
(``write_folder``; ``save_pretrained`` for a model in memory), verified before they are published
(``verify_folder``).

A shard's safetensors file is written here rather than by ``safetensors.torch.save_file``: its header comes from
the model config (names, shapes, dtype) and each tensor's bytes are written straight from its memory, so a view
(an expert split from the fused weights) or a tie (a tied ``lm_head``) needs no copy and the per-tensor bookkeeping
of ``save_file`` is skipped. ``verify_folder`` then reads every file back with safetensors itself.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dlmoe import __version__
from dlmoe.errors import ExportError
from dlmoe.export.hf import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    DLMOE_FILE,
    DLMOE_FORMAT_VERSION,
    INDEX_FILE,
    config_to_hf,
    hf_tensor_shapes,
    read_json,
    to_hf,
)
from dlmoe.model import DiffusionMoE, ModelConfig


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _shard(names: list[str], nbytes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / CONFIG_FILE).exists())):
        raise ExportError(f"{target} exists and is not a model folder; refusing to overwrite it")


def save_pretrained(model: DiffusionMoE, out_dir: str | Path, *, tokenizer: Any | None = None,
                    dtype: torch.dtype | None = None, flavor: str | None = None, step: int | None = None,
                    source_run: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    training: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a release-format folder (atomically: a crash leaves the previous folder or none).

    ``tokenizer`` is anything with ``save(dir)`` (``data_pipeline.tokenizers.Tokenizer``); ``dtype`` casts the
    weights (default: the model's); ``flavor``, ``step``, ``source_run`` and the ``training`` recipe
    (``ObjectiveConfig.recipe``, when not empty) go to dlmoe.json.
    """
    config = model.config
    _check_target(Path(out_dir))
    tensors = to_hf(model.state_dict(), config)
    return write_folder(out_dir, config, lambda names: {k: tensors[k] for k in names},
                        dtype=dtype or model.lm_head.weight.dtype, tokenizer=tokenizer,
                        facts={"flavor": flavor, "step": step, "source_run": source_run,
                               **({"training": training} if training else {})},
                        max_shard_bytes=max_shard_bytes)


def write_folder(out_dir: str | Path, config: ModelConfig, tensors_for: Callable[[list[str]], dict[str, torch.Tensor]],
                 *, dtype: torch.dtype, facts: dict[str, Any], tokenizer: Any | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a release-format folder shard by shard: ``tensors_for(names)`` gives the release-keyed tensors of one
    shard, so no more than a shard's worth is held at once. The folder is staged next to the target, verified
    (every tensor exactly once, with its shape; the index's total size equal to the bytes written) and only then
    moved into place: a crash leaves the previous folder or none."""
    target = Path(out_dir)
    _check_target(target)
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    nbytes = tensor_bytes(config, dtype)
    shards = _shard(list(nbytes), nbytes, max_shard_bytes)
    shapes = hf_tensor_shapes(config)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        weight_map: dict[str, str] = {}
        for number, shard in enumerate(shards, start=1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            given = tensors_for(shard)
            if sorted(given) != sorted(shard):
                raise ExportError(f"shard {filename}: the source gave {sorted(set(given) ^ set(shard))[:5]} "
                                  f"other than the tensors asked for")
            _write_safetensors(staging / filename, {name: (given[name], shapes[name]) for name in shard}, dtype)
            weight_map.update(dict.fromkeys(shard, filename))
        total = sum(nbytes.values())
        _write_json(staging / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(staging / CONFIG_FILE, config_to_hf(config, dtype))
        _write_json(staging / DLMOE_FILE, {"format_version": DLMOE_FORMAT_VERSION, "dlmoe_version": __version__,
                                           "mask_token_id": config.mask_token_id, **facts})
        if tokenizer is not None:
            tokenizer.save(staging)
        verify_folder(staging, config)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def _write_safetensors(path: Path, tensors: dict[str, tuple[torch.Tensor, tuple[int, ...]]],
                       dtype: torch.dtype) -> None:
    """Write ``tensors`` (each with the shape the config gives it) to one safetensors file in ``dtype``, in order."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ExportError(f"cannot write {dtype} tensors to {path.name}: one of "
                          f"{', '.join(str(d) for d in SAFETENSORS_DTYPES)} is needed")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = []
    offset = 0
    for name, (value, shape) in tensors.items():
        tensor = value.detach().to(device="cpu", dtype=dtype).contiguous()
        if tuple(tensor.shape) != shape:
            raise ExportError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, the model's config says {shape}")
        data.append(tensor.reshape(-1).view(torch.uint8).numpy())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + data[-1].nbytes]}
        offset += data[-1].nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for chunk in data:
            handle.write(chunk.data)


def tensor_bytes(config: ModelConfig, dtype: torch.dtype) -> dict[str, int]:
    """The bytes of every release-keyed tensor of ``config`` in ``dtype``, in the folder's order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {name: itemsize * _numel(shape) for name, shape in hf_tensor_shapes(config).items()}


def write_to_uri(target: Any, write: Callable[[Path], Path]) -> None:
    """Have ``write(folder)`` — ``save_pretrained`` or ``write_folder`` bound to their tensors — produce its folder
    at ``target`` (a ``data_pipeline.storage`` location): in place for a local path; for ``s3://`` in a local
    staging folder, uploaded with ``config.json`` last (and removed first when a previous folder is there), so that
    a folder without ``config.json`` is never a finished one."""
    from data_pipeline import storage

    if not target.is_s3:
        write(Path(target.path))
        return
    with tempfile.TemporaryDirectory(prefix="dlmoe-export-") as tmp:
        folder = write(Path(tmp) / "hf")
        done = target.child(CONFIG_FILE)
        if storage.exists(done):
            storage.delete(done)
        files = sorted(p for p in folder.iterdir() if p.name != CONFIG_FILE)
        for path in [*files, folder / CONFIG_FILE]:
            storage.write_bytes(target.child(path.name), path.read_bytes())


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def verify_folder(folder: Path, config: ModelConfig) -> None:
    """Check a written folder without loading its tensors: the index places every expected tensor exactly once,
    each shard holds exactly the tensors the index gives it with the expected shapes, and the index's total size
    is the sum of the tensors' bytes."""
    index = read_json(folder / INDEX_FILE)
    weight_map: dict[str, str] = index.get("weight_map", {})
    expected = hf_tensor_shapes(config)
    if sorted(weight_map) != sorted(expected):
        raise ExportError(f"{folder / INDEX_FILE} does not list exactly the model's tensors: "
                          f"{sorted(set(weight_map) ^ set(expected))[:5]}")
    total = 0
    for filename in sorted(set(weight_map.values())):
        with safe_open(str(folder / filename), framework="pt") as handle:
            stored = set(handle.keys())
            listed = {k for k, f in weight_map.items() if f == filename}
            if stored != listed:
                raise ExportError(f"{folder / filename} holds {sorted(stored ^ listed)[:5]} other than the index says")
            for key in stored:
                piece = handle.get_slice(key)
                shape = tuple(piece.get_shape())
                if shape != expected[key]:
                    raise ExportError(f"{folder / filename}: {key} has shape {shape}, expected {expected[key]}")
                total += _numel(shape) * _DTYPE_BYTES[piece.get_dtype()]
    if total != index.get("metadata", {}).get("total_size"):
        raise ExportError(f"{folder / INDEX_FILE}: total_size {index.get('metadata', {}).get('total_size')} "
                          f"is not the {total} bytes the shards hold")


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
