"""Training-step time of the ``tiny`` flavor against the number of experts E, at fixed active parameters.

What is measured: one optimizer step of ``dlmoe.model.build_model(cfg)`` on CPU in fp32 — forward
(``model(input_ids).logits``, [B, L, V]), loss = cross entropy of the logits against random targets (nothing
else: no load-balance loss), backward, ``torch.optim.AdamW`` step — for E in ``--experts`` (8, 16, 32, 64).
``cfg = dataclasses.replace(get_flavor("tiny"), num_experts=E)``: top-k (num_experts_per_tok = 8) and the expert
width (expert_intermediate_size = 128) stay those of ``tiny``, so the per-token work is the same for every E
(only the router's D x E matrix grows); the total parameter count and the optimizer's work grow with E, and the
tokens per expert shrink (B*L*K/E).

Each E runs in a fresh ``multiprocessing`` spawn subprocess: build the model (seed 0) and AdamW, draw fixed
random ``input_ids`` and targets, run 2 warm-up steps (the first allocates the AdamW state), then time
``--iters`` steps; it also records how many cores other processes kept busy meanwhile (/proc/stat minus its
own CPU time, steal included), since the machine may be shared. Reported: median step ms (and the medians of
its forward / backward / optimizer parts, from the same steps), tokens/s = B*L / median step time, and the
ratio of the median step time to that of the first E listed (E=8 by default).

Run (from the repository root):
    .venv/bin/python bench/experts_scaling.py                  # defaults: --batch 4 --seq 256 --iters 5
    .venv/bin/python bench/experts_scaling.py --iters 2 --batch 2 --seq 128
    .venv/bin/python bench/experts_scaling.py --json /tmp/experts_scaling.json
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from benchutil import CpuContention, bench_parser, failed_row, run_isolated, table_head, write_json

DEFAULT_EXPERTS = (8, 16, 32, 64)
WARMUP = 2
SEED = 0
LR = 1e-4


def run_one(num_experts: int, batch: int, seq: int, iters: int) -> dict[str, Any]:
    """Child-process entry point: build, warm up, time ``iters`` steps; errors go into the result."""
    result: dict[str, Any] = {"num_experts": num_experts, "pid": os.getpid(), "threads": torch.get_num_threads()}
    try:
        from dlmoe.model import build_model, count_parameters, get_flavor

        cfg = dataclasses.replace(get_flavor("tiny"), num_experts=num_experts)
        model = build_model(cfg, seed=SEED)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(SEED)
        input_ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
        targets = torch.randint(0, cfg.vocab_size, (batch * seq,), generator=gen)
        result.update(count_parameters(model), top_k=cfg.num_experts_per_tok,
                      expert_intermediate_size=cfg.expert_intermediate_size, hidden_size=cfg.hidden_size,
                      num_hidden_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size)

        def step() -> tuple[float, float, float]:
            optimizer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logits = model(input_ids).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
            t1 = time.perf_counter()
            torch.autograd.backward(loss)  # == loss.backward(), but typed
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            return t1 - t0, t2 - t1, t3 - t2

        for _ in range(WARMUP):
            step()
        contention = CpuContention()
        parts = [step() for _ in range(iters)]
        others = contention.others_cores()
        totals = [sum(p) for p in parts]
        med = statistics.median(totals)
        result.update(
            step_ms=[t * 1e3 for t in totals], median_ms=med * 1e3, min_ms=min(totals) * 1e3,
            forward_ms=statistics.median(p[0] for p in parts) * 1e3,
            backward_ms=statistics.median(p[1] for p in parts) * 1e3,
            optimizer_ms=statistics.median(p[2] for p in parts) * 1e3,
            tokens_per_s=batch * seq / med, others_cores=others,
        )
    except Exception as exc:  # a failed row is reported as such, never as a number
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    return result


def run_in_subprocess(num_experts: int, batch: int, seq: int, iters: int) -> dict[str, Any]:
    return run_isolated(run_one, {"num_experts": num_experts}, num_experts, batch, seq, iters)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if "median_ms" in r), None)
    base_name = str(base["num_experts"]) if base else "?"
    lines = [table_head("E", "top-k", "total params (M)", "active params (M)", "median step ms", "min ms", "fwd ms",
                        "bwd ms", "AdamW ms", "tokens/s", f"step time / E={base_name}", "others' cores",
                        align="r" * 12)]
    for r in rows:
        if "error" in r:
            lines.append(failed_row(r["num_experts"], r["error"], 12))
            continue
        ratio = r["median_ms"] / base["median_ms"] if base else float("nan")
        lines.append(
            f"| {r['num_experts']} | {r['top_k']} | {r['total_params'] / 1e6:.2f} | {r['active_params'] / 1e6:.2f} | "
            f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | "
            f"{r['optimizer_ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio:.2f} | "
            f"{r['others_cores']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per E (default 5)")
    parser.add_argument("--experts", default=",".join(map(str, DEFAULT_EXPERTS)),
                        help="comma-separated numbers of experts (default 8,16,32,64)")
    args = parser.parse_args()
    experts = [int(s) for s in args.experts.split(",") if s.strip()]

    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "flavor": "tiny", "dtype": "float32", "batch": args.batch,
            "seq": args.seq, "iters": args.iters, "warmup": WARMUP, "optimizer": f"AdamW(lr={LR})",
            "loss": "cross_entropy(logits, random targets)"}
    print(f"# tiny flavor train step (fwd + CE loss + bwd + AdamW) vs num_experts, CPU fp32: batch {args.batch} x "
          f"seq {args.seq} = {args.batch * args.seq} tokens, {args.iters} timed steps after {WARMUP} warm-up, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; each E in a fresh spawn subprocess")
    quiet = CpuContention()
    time.sleep(1.0)
    print(f"# other work on this machine before the run: {quiet.others_cores():.2f} cores busy (of {os.cpu_count()});"
          " others' cores: the same during each row's timed steps (0 = quiet; near 1 or more = disturbed)")

    rows = []
    for e in experts:
        print(f"... E={e}", file=sys.stderr, flush=True)
        row = run_in_subprocess(e, args.batch, args.seq, args.iters)
        if "error" in row:
            print(f"!!! E={e} failed: {row['error']}\n{row.get('traceback', '')}", file=sys.stderr)
        rows.append(row)

    print()
    print(markdown_table(rows))
    if write_json(args.json, {"meta": meta, "rows": rows}):
        print(f"\n# wrote {args.json}")


if __name__ == "__main__":
    main()
