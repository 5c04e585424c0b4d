"""Exporting a checkpoint: ``dlmoe export`` of a ``tiny`` checkpoint made with 2 workers and expert parallelism 2,
against reading and writing the same tensors with safetensors alone.

What is measured (CPU):
1. A ``tiny`` run (64 experts top-8, 4 layers, hidden 256) trained for ``--steps`` steps with 2 workers, EP 2, on a
   local Ray; its final checkpoint holds DeepSpeed's non-expert file and 256 per-expert files. Under ZeRO-0
   (``--zero-stage``, tiny.yaml's) the non-expert file also carries rank 0's optimizer state, which the exporter
   must hash but never reads; from ZeRO-1 on that state lives in other files.
2. *export*: ``export_checkpoint(run, out)`` — find the newest checkpoint, check each model file's checksum, read the
   non-expert and per-expert files, write the sharded safetensors folder, verify it, publish it.
3. *safetensors alone*: ``load_file`` every shard of the exported folder and ``save_file`` it again elsewhere — the
   bytes a format conversion cannot avoid reading and writing.
Each side runs ``--repeats`` times, each in a fresh process (its peak RSS is the process's ``ru_maxrss``); the
table gives medians. The ratio is safetensors time / export time: the target is ≥ 0.5.

Run (from the repository root):
    .venv/bin/python bench/export.py
    .venv/bin/python bench/export.py --json /tmp/export.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchutil import bench_parser, maxrss_bytes, table_head, write_json

HERE = Path(__file__).resolve()


def measure(kind: str, source: str, out: str) -> dict[str, float]:
    """One timed export or copy in this process (imports before the clock starts)."""
    from safetensors.torch import load_file, save_file

    from dlmoe.export.checkpoint import export_checkpoint

    # The imports leave a full garbage collection due; whichever side allocated first would pay for it.
    gc.collect()
    start = time.perf_counter()
    if kind == "export":
        export_checkpoint(source, out)
    else:
        Path(out).mkdir(parents=True)
        for shard in sorted(Path(source).glob("*.safetensors")):
            save_file(load_file(shard), str(Path(out) / shard.name), metadata={"format": "pt"})
    return {"seconds": time.perf_counter() - start, "maxrss_mib": maxrss_bytes() / 2**20}


def in_fresh_process(kind: str, source: str, out: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, str(HERE), "--measure", kind, "--source", source, "--out", out],
                          capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage of the run (0: tiny.yaml's)")
    parser.add_argument("--measure", choices=("export", "safetensors"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.source, args.out)))
        return

    from dlmoe.config import load_job_config
    from dlmoe.train.driver import run_training

    work = Path(tempfile.mkdtemp(prefix="dlmoe-bench-export-"))
    job = load_job_config("jobs/tiny.yaml", [
        f"train.steps={args.steps}", "train.warmup_steps=1", f"checkpoint.storage={work / 'runs'}", "run_name=tiny-ep2",
        "parallel.num_workers=2", "parallel.ep_size=2", "data.seq_len=128", "data.global_batch_size=4",
        "data.micro_batch_size=2", "tracking.enabled=false", f"parallel.zero_stage={args.zero_stage}"])
    trained = run_training(job, progress=False)
    run, folder = work / "runs" / "tiny-ep2", Path(trained.export)
    results: dict[str, Any] = {"folder_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}
    for kind, source in (("export", str(run)), ("safetensors", str(folder))):
        runs = [in_fresh_process(kind, source, str(work / f"{kind}-{i}")) for i in range(args.repeats)]
        results[kind] = {"seconds": statistics.median(r["seconds"] for r in runs),
                         "maxrss_mib": statistics.median(r["maxrss_mib"] for r in runs)}
    export, plain = results["export"], results["safetensors"]
    print(f"\ntiny, 2 workers, EP 2, ZeRO-{args.zero_stage}: {results['folder_bytes'] / 2**20:.1f} MiB of weights; "
          f"median of {args.repeats} fresh processes each\n")
    print(table_head("step", "seconds", "peak RSS MiB", "ratio", align="lrrr"))
    print(f"| `dlmoe export` of the run's checkpoint | {export['seconds']:.2f} | {export['maxrss_mib']:.0f} | "
          f"{plain['seconds'] / export['seconds']:.2f} |")
    print(f"| safetensors alone: read + write the exported shards | {plain['seconds']:.2f} | "
          f"{plain['maxrss_mib']:.0f} | 1.00 |")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
