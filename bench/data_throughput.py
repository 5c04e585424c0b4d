"""Data pipeline throughput: the Ray Data tokenize job against raw ``encode_batch``, and the training stream from
an S3 endpoint against a raw pyarrow read and against what one ``tiny`` training worker consumes.

What is measured (fp32 CPU, this machine):
1. **Tokenize.** Corpus: the standard library's ``.py`` sources (sorted, the first ``--mb`` MiB, ``site-packages``
   left out). Tokenizer: a byte-level BPE with a 16k vocabulary trained on that corpus in this process (a real
   merge table, as LLaDA-MoE's has; ``--tokenizer bytes`` uses the built-in byte vocabulary instead). *Raw*: read
   the files, one ``Tokenizer.encode_batch`` over all of them in one process. *Job*: ``run_tokenize`` to a local
   folder (listing, Ray Data tasks of ``--unit-mb`` input each that read, tokenize, pack and write zstd parquet
   shards with checksums, the manifest) on the local Ray started beforehand, whose worker processes are warmed by
   a one-file job first (start-up is not timed: a cluster is already up in production, and on a real corpus the
   workers' imports are noise). Both count the text tokens (EOS separators and padding excluded). Each arm runs
   ``--repeats`` times alternately; the medians are compared.
2. **Stream.** The job's dataset is written to a moto S3 server on 127.0.0.1. *Raw*: read every shard with pyarrow
   from that endpoint (``open_input_stream`` + ``pq.read_table`` + ``to_numpy``). *TokenStream*: one epoch of
   rank 0 of 1, global batch 64, ``window_shards`` 4 (reads, sha256 and page-checksum checks, shuffle). Then one
   ``tiny``-flavor training worker: forward, masked-diffusion loss and balance losses, backward and AdamW on
   batches of the same ``seq_len`` — the tokens/s it consumes. Reported: stream/raw and stream/worker ratios.

Run (from the repository root):
    .venv/bin/python bench/data_throughput.py     # defaults: --mb 12 --seq-len 1024 --repeats 3 --unit-mb 6 4 1
    .venv/bin/python bench/data_throughput.py --tokenizer bytes --json /tmp/data_throughput.json
"""

from __future__ import annotations

import dataclasses
import io
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import torch
from benchutil import CpuContention, bench_parser, table_head, write_json
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_pipeline import storage
from data_pipeline.local_s3 import create_bucket, local_s3_server
from data_pipeline.ray_jobs import ensure_ray
from data_pipeline.shards import read_manifest
from data_pipeline.stream import TokenStream
from data_pipeline.tokenize import TokenizeSpec, plan_units, run_tokenize
from data_pipeline.tokenizers import SpecialIds, Tokenizer, byte_tokenizer, load_tokenizer
from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.model import build_model, get_flavor


def corpus_files(limit_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= limit_bytes:
            break
    return files


def bpe_tokenizer(files: list[Path], folder: Path) -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, special_tokens=["<|eos|>", "<|pad|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train([str(f) for f in files], trainer)
    ids = [backend.token_to_id(t) for t in ("<|eos|>", "<|pad|>", "<|mask|>")]
    Tokenizer(backend, SpecialIds(*ids), name="stdlib-bpe-16k").save(folder)
    return load_tokenizer(folder)


def raw_encode(files: list[Path], tokenizer: Tokenizer) -> tuple[float, int]:
    start = time.perf_counter()
    texts = [f.read_bytes().decode("utf-8") for f in files]  # as the job reads: no newline translation
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return time.perf_counter() - start, tokens


def tokenize_job(inputs: list[str], tokenizer_path: str | None, seq_len: int, output: str,
                 unit_mb: float) -> tuple[float, int]:
    start = time.perf_counter()
    manifest = run_tokenize(TokenizeSpec(output=output, seq_len=seq_len, inputs=inputs, tokenizer=tokenizer_path,
                                         overwrite=True, unit_bytes=int(unit_mb * 2**20)), progress=False)
    seconds = time.perf_counter() - start
    text_tokens = manifest.tokens - manifest.stats["documents"] - manifest.stats["eos_padding_tokens"]
    return seconds, text_tokens


def raw_s3_read(uri: str) -> tuple[float, int]:
    manifest = read_manifest(uri)
    folder = storage.resolve(uri)
    start = time.perf_counter()
    tokens = 0
    for info in manifest.shards:
        loc = folder.child(info.path)
        with loc.fs.open_input_stream(loc.path) as stream:
            table = pq.read_table(io.BytesIO(stream.read()))
        tokens += table.column("input_ids").combine_chunks().values.to_numpy().size
    return time.perf_counter() - start, tokens


def stream_epoch(uri: str) -> tuple[float, int]:
    stream = TokenStream(uri, global_batch_size=64, seed=0, window_shards=4, max_batches=None)
    start = time.perf_counter()
    tokens = 0
    for _, batch in zip(range(stream.batches_per_epoch), stream, strict=False):
        tokens += batch["input_ids"].size
    return time.perf_counter() - start, tokens


def training_consumption(seq_len: int, vocab: int, steps: int = 3, batch: int = 4) -> float:
    """Tokens/s one ``tiny`` worker trains on (after one warm-up step)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_flavor("tiny"), vocab_size=vocab, max_position_embeddings=max(2048, seq_len),
                              eos_token_id=vocab - 3, pad_token_id=vocab - 2, mask_token_id=vocab - 1)
    model = build_model(cfg, seed=0)
    objective = MaskedDiffusionObjective(ObjectiveSettings(mask_token_id=cfg.mask_token_id, seed=0,
                                                           global_batch_size=batch, variable_length_prob=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab - 3, (batch, seq_len))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        out = objective(model, ids, torch.arange(step * batch, (step + 1) * batch), epoch=0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return batch * seq_len / statistics.median(times)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mb", type=float, default=12.0, help="corpus size in MiB (at most what the stdlib holds)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unit-mb", type=float, nargs="+", default=[6.0, 4.0, 1.0],
                        help="the job's input MiB per task; one job row per value")
    parser.add_argument("--tokenizer", choices=("bpe", "bytes"), default="bpe")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dlmoe-bench-data-"))
    files = corpus_files(int(args.mb * 2**20))
    corpus = work / "corpus"
    corpus.mkdir()
    for i, f in enumerate(files):
        (corpus / f"{i:05d}_{f.name}").write_bytes(f.read_bytes())
    corpus_files_sorted = sorted(corpus.iterdir())
    if args.tokenizer == "bpe":
        tokenizer_dir = work / "tokenizer"
        tokenizer_dir.mkdir()
        tokenizer, tokenizer_path = bpe_tokenizer(corpus_files_sorted, tokenizer_dir), str(tokenizer_dir)
    else:
        tokenizer, tokenizer_path = byte_tokenizer(), None
    sizes = [(str(f), f.stat().st_size) for f in corpus_files_sorted]
    mib = sum(n for _, n in sizes) / 2**20
    print(f"corpus: {len(files)} files, {mib:.1f} MiB; tokenizer {args.tokenizer} (vocab {tokenizer.vocab_size})")

    results: dict[str, Any] = {"corpus_files": len(files), "corpus_mib": mib, "tokenizer": args.tokenizer}
    with local_s3_server() as endpoint:
        ensure_ray()
        results["ray_cpus"] = int(ray.cluster_resources().get("CPU", 0))
        # Start the Ray worker processes (imports) on a one-file job: on a real corpus their start-up is noise.
        tokenize_job([str(corpus_files_sorted[0])], tokenizer_path, args.seq_len, str(work / "warmup"), 1.0)
        contention = CpuContention()
        raw_runs: list[tuple[float, int]] = []
        job_runs: dict[float, list[tuple[float, int]]] = {u: [] for u in args.unit_mb}
        for _ in range(args.repeats):
            raw_runs.append(raw_encode(corpus_files_sorted, tokenizer))
            for unit_mb in args.unit_mb:
                job_runs[unit_mb].append(tokenize_job([str(corpus)], tokenizer_path, args.seq_len,
                                                      str(work / "dataset"), unit_mb))
        raw_s, raw_tokens = statistics.median(r[0] for r in raw_runs), raw_runs[0][1]
        results["tokenize"] = {"tokens": raw_tokens, "raw_tokens_per_s": raw_tokens / raw_s,
                               "raw_s": [r[0] for r in raw_runs], "jobs": []}
        for unit_mb, runs in job_runs.items():
            assert all(r[1] == raw_tokens for r in runs), (raw_tokens, runs)
            job_s = statistics.median(r[0] for r in runs)
            results["tokenize"]["jobs"].append({
                "unit_mb": unit_mb, "tasks": len(plan_units(sizes, int(unit_mb * 2**20))),
                "job_tokens_per_s": raw_tokens / job_s,
                "job_over_raw": raw_s / job_s, "job_s": [r[0] for r in runs]})

        create_bucket(endpoint, "bench")
        uri = "s3://bench/dataset"
        run_tokenize(TokenizeSpec(output=uri, seq_len=args.seq_len, inputs=[str(corpus)], tokenizer=tokenizer_path,
                                  unit_bytes=int(args.unit_mb[0] * 2**20)), progress=False)
        raw_reads = [raw_s3_read(uri) for _ in range(args.repeats)]
        streams = [stream_epoch(uri) for _ in range(args.repeats)]
        read_s, read_tokens = statistics.median(r[0] for r in raw_reads), raw_reads[0][1]
        stream_s, stream_tokens = statistics.median(r[0] for r in streams), streams[0][1]
        train_tps = training_consumption(args.seq_len, max(tokenizer.vocab_size, 264))
        results["stream"] = {"raw_read_tokens_per_s": read_tokens / read_s,
                             "stream_tokens_per_s": stream_tokens / stream_s,
                             "stream_over_raw": (stream_tokens / stream_s) / (read_tokens / read_s),
                             "tiny_worker_tokens_per_s": train_tps,
                             "stream_over_worker": (stream_tokens / stream_s) / train_tps}
        results["other_cores_busy"] = contention.others_cores()

    t, s = results["tokenize"], results["stream"]
    ray_cpus = results["ray_cpus"]
    print(f"\nprocesses other than this one (the job's Ray workers and the moto server included) kept "
          f"{results['other_cores_busy']:.2f} cores busy; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(table_head("measurement", "tokens/s", "ratio", align="lrr"))
    print(f"| raw `encode_batch`, one process | {t['raw_tokens_per_s']:,.0f} | 1.00 |")
    for job in t["jobs"]:
        print(f"| Ray Data tokenize job, {job['unit_mb']:g} MiB per task ({job['tasks']} tasks on "
              f"{ray_cpus} CPUs) | {job['job_tokens_per_s']:,.0f} | {job['job_over_raw']:.2f} |")
    print(f"| raw pyarrow read of the shards from S3 (moto) | {s['raw_read_tokens_per_s']:,.0f} | 1.00 |")
    print(f"| TokenStream, one epoch from S3 (checks, shuffle, rank slicing) | {s['stream_tokens_per_s']:,.0f} | "
          f"{s['stream_over_raw']:.2f} |")
    print(f"| one `tiny` training worker consumes (seq_len {args.seq_len}) | {s['tiny_worker_tokens_per_s']:,.0f} | "
          f"stream / worker = {s['stream_over_worker']:.0f}× |")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
