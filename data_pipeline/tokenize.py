"""The tokenize job: documents → token rows of exactly ``seq_len`` → parquet shards + ``manifest.json``, on Ray Data.

The input files are listed in sorted order and grouped into *units* of about ``unit_bytes`` each; unit ``i``
becomes shard ``i``. A Ray Data pipeline maps ``map_batches`` over the units (one unit per batch, so one task per
unit spreads over the cluster): read the unit's documents → tokenize them (``encode_batch``) → pack them,
separated by EOS, into full rows → write the shard. What a unit leaves over (less than one row) comes back to the
driver with the shard's metadata; the leftovers are packed, in unit order, into a last shard whose final row is
padded with EOS. Every row records its document boundaries (``doc_ids``: a document is its tokens and the EOS
after them; the EOS padding counts as one more document). So no token is dropped, a document longer than a row
is split across rows, and the output is byte-identical for the same input whatever the cluster size. With a
validation fraction, each document whose text hashes below it goes instead to a held-out dataset of the same
layout in the ``validation/`` folder (what ``data.validation=heldout`` evaluates). SFT data makes one row per
example instead
(``prompt_len`` column; response padded with EOS); an example longer than ``seq_len`` cannot be split and is
skipped, counted in the manifest and reported.

The manifest is written last, after any previous one was deleted, so a job that fails leaves no manifest and the
half-written folder can never be read as a dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer as Backend
from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.jsonl import jsonl_records
from data_pipeline.ray_jobs import ensure_ray
from data_pipeline.shards import (
    FORMAT_VERSION,
    HELDOUT_FOLDER,
    MANIFEST_FILE,
    Manifest,
    ShardInfo,
    read_manifest,
    row_doc_ids,
    shard_name,
    write_manifest,
    write_shard,
)
from data_pipeline.tokenizers import SpecialIds, Tokenizer, byte_tokenizer, load_tokenizer
from dlmoe.errors import DataError

FORMATS = ("text", "jsonl", "parquet")
TRAIN = "train"
_SUFFIXES: dict[str, tuple[str, ...]] = {"text": (), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


def default_corpus() -> list[str]:
    """The embedded default corpus: the Python standard library's top-level ``.py`` files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in root.glob("*.py"))
    if not files:
        raise DataError(f"no Python sources found under {root} for the default corpus")
    return files


@dataclass
class TokenizeSpec:
    """What ``dlmoe tokenize`` was asked to do."""

    output: str
    seq_len: int
    inputs: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    fmt: str = "text"
    text_field: str = "text"
    sft: bool = False
    overwrite: bool = False
    endpoint_url: str | None = None
    unit_bytes: int = 32 * 2**20
    validation_fraction: float = 0.0


@dataclass
class _Unit:
    index: int
    files: list[str]


def plan_units(files: list[tuple[str, int]], unit_bytes: int) -> list[_Unit]:
    """Group (uri, bytes) files, in order, into units of at most ``unit_bytes`` (at least one file each)."""
    units: list[_Unit] = []
    size = 0
    for uri, nbytes in files:
        if not units or (size + nbytes > unit_bytes and units[-1].files):
            units.append(_Unit(len(units), []))
            size = 0
        units[-1].files.append(uri)
        size += nbytes
    return units


def _list_inputs(spec: TokenizeSpec) -> list[tuple[str, int]]:
    inputs = spec.inputs or default_corpus()
    found: list[tuple[str, int]] = []
    for uri in inputs:
        loc = storage.resolve(uri, endpoint_url=spec.endpoint_url)
        if not storage.exists(loc):
            raise DataError(f"input {uri} does not exist")
        for file, size in storage.list_files(loc, _SUFFIXES[spec.fmt]):
            if Path(file.path).name.startswith("."):
                continue
            found.append((file.uri, size))
    if not found:
        raise DataError(f"no {spec.fmt} input files under {', '.join(inputs)}")
    return found


def _documents(uri: str, spec: dict[str, Any]) -> Iterator[Any]:
    """The documents of one file: a whole text file, one JSON object per jsonl line, or a parquet column."""
    loc = storage.resolve(uri, endpoint_url=spec["endpoint_url"])
    data = storage.read_bytes(loc)
    fmt, text_field = spec["fmt"], spec["text_field"]
    if fmt == "parquet":
        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:
            raise DataError(f"cannot read parquet input {uri}: {exc}") from exc
        if text_field not in table.column_names:
            raise DataError(f"parquet input {uri} has no column '{text_field}' (--text-field); columns: "
                            f"{', '.join(table.column_names)}")
        yield from (t for t in table.column(text_field).to_pylist() if t)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"input {uri} is not UTF-8 text ({exc})") from exc
    if fmt == "text":
        if text:
            yield text
        return
    for at, record in jsonl_records(text, uri):
        if spec["sft"]:
            yield _sft_pair(record, at)
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{at}: no string field '{text_field}' (--text-field)")
        if value:
            yield value


def _sft_pair(record: Any, where: str) -> tuple[str, str]:
    """(prompt, response) from ``{"prompt", "response"}`` or chat ``{"messages": [{"role", "content"}, ...]}``;
    messages are rendered as ``role: content`` lines, the last assistant message being the response."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return record["prompt"], record["response"]
    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        last = messages[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            context = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages[:-1])
            return context + "assistant: ", last["content"]
    raise DataError(f"{where}: an SFT example needs string 'prompt' and 'response', or 'messages' ending with an "
                    f"assistant message")


def _tokenizer_from(spec: dict[str, Any]) -> Tokenizer:
    return Tokenizer(Backend.from_str(spec["tokenizer_json"]), SpecialIds(**spec["special"]), spec["tokenizer_name"])


def held_out(document: str | tuple[str, str], fraction: float) -> bool:
    """Whether a document goes to the held-out set: the hash of its text, read as a number in [0, 1), falls below
    ``fraction``. The split depends on nothing but the text — not the file order, the unit or the cluster — and a
    document repeated in the corpus lands on the same side every time, so no copy of a validation text is trained."""
    if fraction <= 0.0:
        return False
    text = document if isinstance(document, str) else "\x00".join(document)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _process_unit(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """One Ray Data batch = one unit: read → tokenize → pack → write its shards (training and held-out); return
    their metadata and leftovers, one row per part.

    A ``DataError`` (a file that cannot be read or parsed) comes back in the ``error`` column for the driver to
    raise, so the user sees our message rather than Ray's wrapper of it.
    """
    index = int(batch["unit"][0])
    try:
        return _pack_unit(index, json.loads(str(batch["files"][0])), spec)
    except DataError as exc:
        return {"unit": np.asarray([index]), "part": np.asarray([""]), "documents": np.asarray([0]),
                "skipped": np.asarray([0]), "shard": np.asarray(["null"]), "tail": np.asarray([b""], dtype=object),
                "tail_docs": np.asarray([b""], dtype=object), "error": np.asarray([str(exc)])}


def _pack_unit(index: int, files: list[str], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    tokenizer = _tokenizer_from(spec)
    root = storage.resolve(spec["output"], endpoint_url=spec["endpoint_url"])
    documents = [doc for uri in files for doc in _documents(uri, spec)]
    parts: dict[str, list[Any]] = {TRAIN: [], HELDOUT_FOLDER: []}
    for document in documents:
        parts[HELDOUT_FOLDER if held_out(document, spec["validation_fraction"]) else TRAIN].append(document)
    packed = [_pack(index, part_documents, tokenizer, root if part == TRAIN else root.child(part), spec)
              for part, part_documents in parts.items()]
    return {
        "unit": np.asarray([index] * len(parts)), "part": np.asarray(list(parts)),
        "documents": np.asarray([len(d) for d in parts.values()]),
        "skipped": np.asarray([p[1] for p in packed]),
        "shard": np.asarray([json.dumps(None if p[0] is None else p[0].__dict__) for p in packed]),
        "tail": np.asarray([p[2].tobytes() for p in packed], dtype=object),
        "tail_docs": np.asarray([p[3].tobytes() for p in packed], dtype=object), "error": np.asarray([""] * len(parts)),
    }


def _pack(index: int, documents: list[Any], tokenizer: Tokenizer, folder: storage.Location,
          spec: dict[str, Any]) -> tuple[ShardInfo | None, int, np.ndarray, np.ndarray]:
    """Pack one part's documents into shard ``index`` of ``folder``: (its info or None, SFT examples skipped,
    the tokens left over, their document numbers within the unit)."""
    eos, seq_len = tokenizer.special.eos, spec["seq_len"]
    skipped = 0
    tail = np.zeros(0, dtype=np.int32)
    tail_docs = np.zeros(0, dtype=np.int64)
    info: ShardInfo | None = None
    if spec["sft"]:
        rows, prompt_lens = [], []
        # One encode_batch over the whole unit: the tokenizer parallelises across documents only within a call.
        prompts = tokenizer.encode_batch([p for p, _ in documents])
        responses = tokenizer.encode_batch([r for _, r in documents])
        for prompt, response in zip(prompts, responses, strict=True):
            if len(prompt) + len(response) + 1 > seq_len:
                skipped += 1
                continue
            rows.append(prompt + response + [eos] * (seq_len - len(prompt) - len(response)))
            prompt_lens.append(len(prompt))
        if rows:
            info = write_shard(folder, shard_name(index), np.asarray(rows, dtype=np.int32),
                               np.asarray(prompt_lens, dtype=np.int32))
        return info, skipped, tail, tail_docs
    encoded = tokenizer.encode_batch(documents)
    lengths = np.asarray([len(ids) + 1 for ids in encoded], dtype=np.int64)
    stream = np.full(int(lengths.sum()), eos, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if documents else np.zeros(0, dtype=np.int64)
    for start, ids in zip(offsets.tolist(), encoded, strict=True):
        stream[start:start + len(ids)] = ids
    docs = np.repeat(np.arange(len(documents), dtype=np.int64), lengths)
    full = stream.size // seq_len
    if full:
        info = write_shard(folder, shard_name(index), stream[:full * seq_len].reshape(full, seq_len),
                           doc_ids=row_doc_ids(docs[:full * seq_len], seq_len))
    return info, skipped, stream[full * seq_len:], docs[full * seq_len:]


def _settings_fingerprint(spec: TokenizeSpec, files: list[tuple[str, int]], tokenizer: Tokenizer) -> str:
    settings = {"files": files, "seq_len": spec.seq_len, "fmt": spec.fmt, "text_field": spec.text_field,
                "sft": spec.sft, "tokenizer": tokenizer.fingerprint, "unit_bytes": spec.unit_bytes,
                **({"validation_fraction": spec.validation_fraction} if spec.validation_fraction else {})}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def run_tokenize(spec: TokenizeSpec, *, progress: bool = True) -> Manifest:
    """Run the tokenize job and return the manifest of the dataset written at ``spec.output`` (with
    ``validation_fraction``, the held-out set is a dataset of its own in its ``validation/`` folder)."""
    import ray.data

    if spec.seq_len <= 1:
        raise DataError(f"--seq-len must be at least 2, got {spec.seq_len}")
    if spec.fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got '{spec.fmt}'")
    if spec.sft and spec.fmt != "jsonl":
        raise DataError("SFT data (--sft) is read from jsonl files (prompt/response or chat messages)")
    if not 0.0 <= spec.validation_fraction < 1.0:
        raise DataError(f"--validation-fraction must be in [0, 1), got {spec.validation_fraction}")
    tokenizer = load_tokenizer(spec.tokenizer) if spec.tokenizer else byte_tokenizer()
    files = _list_inputs(spec)
    fingerprint = _settings_fingerprint(spec, files, tokenizer)
    folder = storage.resolve(spec.output, endpoint_url=spec.endpoint_url)
    manifest_loc = folder.child(MANIFEST_FILE)
    if storage.exists(manifest_loc):
        existing = read_manifest(spec.output, endpoint_url=spec.endpoint_url)
        same = existing.settings_fingerprint == fingerprint
        if same and existing.format_version == FORMAT_VERSION and not spec.overwrite:
            return existing
        # The same settings in an older format are written again (now with document boundaries).
        if not same and not spec.overwrite:
            raise DataError(f"{spec.output} already holds a different dataset ({existing.rows} rows of "
                            f"{existing.seq_len} tokens from {len(existing.source)} inputs); pass --overwrite "
                            f"to replace it")
        storage.delete(manifest_loc)
    held_manifest = folder.child(HELDOUT_FOLDER).child(MANIFEST_FILE)
    if storage.exists(held_manifest):
        storage.delete(held_manifest)

    units = plan_units(files, spec.unit_bytes)
    worker_spec = {
        "output": spec.output, "endpoint_url": storage.s3_endpoint(spec.endpoint_url), "seq_len": spec.seq_len,
        "fmt": spec.fmt, "text_field": spec.text_field, "sft": spec.sft,
        "tokenizer_json": tokenizer.backend.to_str(), "tokenizer_name": tokenizer.name,
        "special": {"eos": tokenizer.special.eos, "pad": tokenizer.special.pad, "mask": tokenizer.special.mask},
        "validation_fraction": spec.validation_fraction,
    }
    ensure_ray()
    items = ray.data.from_items([{"unit": u.index, "files": json.dumps(u.files)} for u in units],
                                override_num_blocks=len(units))
    dataset = items.map_batches(functools.partial(_process_unit, spec=worker_spec), batch_size=1, batch_format="numpy")
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tqdm(total=len(units), desc=f"tokenize → {spec.output}", unit="unit", disable=not progress) as bar:
        for row in dataset.iter_rows():
            if row["error"]:
                raise DataError(str(row["error"]))
            results[str(row["part"]), int(row["unit"])] = row
            bar.update(row["part"] == TRAIN)

    assemble = functools.partial(_assemble, spec=spec, tokenizer=tokenizer, files=files, fingerprint=fingerprint,
                                 units=len(units))
    if spec.validation_fraction:
        held = assemble(folder.child(HELDOUT_FOLDER), [results[HELDOUT_FOLDER, i] for i in range(len(units))])
        if held is None:
            raise DataError(f"no document of {spec.output}'s corpus fell in the held-out fraction "
                            f"{spec.validation_fraction:g}; raise --validation-fraction")
    manifest = assemble(folder, [results[TRAIN, i] for i in range(len(units))])
    if manifest is None:
        raise DataError(f"the corpus ({len(files)} files) holds no documents"
                        + (" outside the held-out fraction" if spec.validation_fraction else ""))
    return manifest


def _assemble(folder: storage.Location, rows: list[dict[str, Any]], *, spec: TokenizeSpec, tokenizer: Tokenizer,
              files: list[tuple[str, int]], fingerprint: str, units: int) -> Manifest | None:
    """Pack the units' leftovers into a last shard and write the manifest of one part (training or held-out),
    last; None when the part got no document."""
    shards: list[ShardInfo] = []
    documents = skipped = 0
    tails, tail_docs = [], []
    next_doc = 0
    for row in rows:
        documents += int(row["documents"])
        skipped += int(row["skipped"])
        shard = json.loads(str(row["shard"]))
        if shard is not None:
            shards.append(ShardInfo(**shard))
        tails.append(np.frombuffer(row["tail"], dtype=np.int32))
        docs = np.frombuffer(row["tail_docs"], dtype=np.int64)
        if docs.size:  # renumbered so that no two units' leftover documents share a number
            tail_docs.append(docs - docs[0] + next_doc)
            next_doc = int(tail_docs[-1][-1]) + 1
    if documents == 0:
        return None
    leftover = np.concatenate(tails) if tails else np.zeros(0, dtype=np.int32)
    padded = (-leftover.size) % spec.seq_len
    if leftover.size:
        packed = np.concatenate([leftover, np.full(padded, tokenizer.special.eos, dtype=np.int32)])
        doc_ids = None
        if not spec.sft:
            doc_ids = row_doc_ids(np.concatenate([*tail_docs, np.full(padded, next_doc)]), spec.seq_len)
        shards.append(write_shard(folder, shard_name(units), packed.reshape(-1, spec.seq_len), doc_ids=doc_ids))
    if not shards:
        raise DataError(f"no SFT example of {folder.uri} fits in seq_len {spec.seq_len} ({skipped} skipped)")
    manifest = Manifest(
        kind="sft" if spec.sft else "pretrain", seq_len=spec.seq_len,
        tokenizer={"name": tokenizer.name, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                   "eos_id": tokenizer.special.eos, "pad_id": tokenizer.special.pad,
                   "mask_id": tokenizer.special.mask},
        shards=shards, source=[uri for uri, _ in files],
        stats={"documents": documents, "input_bytes": sum(n for _, n in files), "eos_padding_tokens": padded,
               "sft_examples_too_long": skipped},
        settings_fingerprint=fingerprint, doc_ids=not spec.sft,
    )
    write_manifest(folder, manifest)
    return manifest
