"""Model FLOP utilisation of a ~1B LLaDA-MoE variant training in bf16 on one GPU.

The model is the release geometry (``llada-moe-7b-a1b``: hidden 2048, 16 heads, QK norm, experts of width 1024,
top-8 of softmax, vocabulary 157,184) cut to ``--layers`` 4 layers of ``--experts`` 32 experts: 1.52B parameters,
0.91B active per token with the embedding table, 0.59B without it (the count the FLOPs use; printed). Two loops
train it on the same random token batches with the masked-diffusion objective (no variable-length cut):

- *stack*: what a worker runs — the DeepSpeed engine of ``dlmoe.parallel`` (bf16, ZeRO-1, clipping, AdamW, WSD) in a
  one-process group, stepped by ``dlmoe.train.step.train_step``;
- *plain*: the model in fp32 under ``torch.autocast(bfloat16)`` with fused AdamW and clipping.

Model FLOPs per step are 6 · active parameters · tokens + attention 12 · layers · seq_len · hidden · tokens; they are
divided by the median step time (after ``--warmup`` steps), then by the bf16 ``torch.mm`` rate measured on the same
card (16384³) and by the card's nominal dense bf16 peak where the card is known.

Run on a GPU machine (from the repository root):
    .venv/bin/python bench/gpu_step.py --json /tmp/gpu_step.json
A CPU smoke run of the same code (the ``debug`` flavor, fp32, no peak claims):
    .venv/bin/python bench/gpu_step.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from benchutil import (
    bench_parser,
    matmul_peak_gflops,
    one_rank_group,
    synchronize,
    table_head,
    train_step_flops,
    write_json,
)

from dlmoe.config import JobConfig, load_job_config
from dlmoe.diffusion import MaskedDiffusionObjective
from dlmoe.model import build_model, count_parameters
from dlmoe.parallel import parallelize
from dlmoe.train.step import objective_settings, train_step

# Nominal dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts; no sparsity).
NOMINAL_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def nominal_peak(card: str) -> float | None:
    for name, tflops in NOMINAL_BF16_TFLOPS.items():
        if name in card:
            return tflops
    return None


def job_overrides(args: argparse.Namespace, gpu: bool) -> list[str]:
    steps = args.warmup + args.iters
    common = [f"data.seq_len={args.seq_len}", f"data.global_batch_size={args.batch}",
              f"data.micro_batch_size={args.batch}", f"train.steps={steps}", "train.warmup_steps=1",
              "objective.variable_length_prob=0", "parallel.num_workers=1", "parallel.ep_size=1",
              "parallel.zero_stage=1", "export.enabled=false", "tracking.enabled=false"]
    if not gpu:
        return [*common, "model.flavor=debug"]
    return [*common, "model.flavor=llada-moe-7b-a1b", f"model.num_hidden_layers={args.layers}",
            f"model.num_experts={args.experts}", f"model.moe_layer_freq=[{','.join(['1'] * args.layers)}]",
            "parallel.use_gpu=true", "train.precision=bf16"]


def batches(count: int, batch: int, seq_len: int, vocab: int) -> list[dict[str, Any]]:
    """Random token rows (ids below the special tokens), shaped as ``TokenStream`` yields them."""
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, vocab - 8, (batch, seq_len), dtype=np.int64),
             "sample_index": np.arange(i * batch, (i + 1) * batch, dtype=np.int64), "epoch": 0}
            for i in range(count)]


def timed(step: Any, data: list[dict[str, Any]], warmup: int, device: str) -> list[float]:
    times = []
    for i, batch in enumerate(data):
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def stack_loop(job: JobConfig, data: list[dict[str, Any]], warmup: int, device: str) -> list[float]:
    config = job.model.to_model_config()
    engine = parallelize(build_model(config, device=device, seed=0), job, use_gpu=device == "cuda")
    objective = MaskedDiffusionObjective(objective_settings(job))
    return timed(lambda b: train_step(engine, objective, b, job.micro_batch_per_worker, 1), data, warmup, device)


def plain_loop(job: JobConfig, data: list[dict[str, Any]], warmup: int, device: str) -> list[float]:
    config, t = job.model.to_model_config(), job.train
    model = build_model(config, device=device, seed=0)
    objective = MaskedDiffusionObjective(objective_settings(job))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
                                  fused=device == "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step(batch: dict[str, Any]) -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            out = objective(model, torch.from_numpy(batch["input_ids"]).to(device),
                            torch.from_numpy(batch["sample_index"]), batch["epoch"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()

    return timed(step, data, warmup, device)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="run the same code on the CPU with the debug flavor")
    args = parser.parse_args()
    gpu = not args.smoke
    if gpu and not torch.cuda.is_available():
        parser.error("no CUDA device here; run on a GPU machine, or pass --smoke for a CPU check of the code")
    if args.smoke:
        args.seq_len, args.batch, args.warmup, args.iters = 64, 2, 1, 2
    device = "cuda" if gpu else "cpu"
    job = load_job_config(None, job_overrides(args, gpu))
    config = job.model.to_model_config()
    counts = count_parameters(build_model(config, device="meta"))
    data = batches(args.warmup + args.iters, args.batch, args.seq_len, config.vocab_size)
    flops = train_step_flops(build_model(config, device="meta"), args.batch, args.seq_len)
    card = torch.cuda.get_device_name() if gpu else "CPU"
    results: dict[str, Any] = {"card": card, "torch": torch.__version__, "layers": config.num_hidden_layers,
                               "experts": config.num_experts, "seq_len": args.seq_len, "batch": args.batch,
                               **counts, "step_flops": flops}
    with one_rank_group("nccl" if gpu else "gloo"):
        for name, loop in (("stack", stack_loop), ("plain", plain_loop)):
            seconds = statistics.median(loop(job, data, args.warmup, device))
            results[name] = {"step_s": seconds, "tflops": flops / seconds / 1e12}
            if gpu:
                torch.cuda.empty_cache()
                results[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()

    measured = matmul_peak_gflops(16384, device=device, dtype=torch.bfloat16) / 1e3 if gpu else None
    nominal = nominal_peak(card) if gpu else None
    results.update(measured_bf16_mm_tflops=measured, nominal_bf16_tflops=nominal,
                   stack_over_plain=results["plain"]["step_s"] / results["stack"]["step_s"])
    for name in ("stack", "plain"):
        r = results[name]
        r["mfu_measured"] = r["tflops"] / measured if measured else None
        r["mfu_nominal"] = r["tflops"] / nominal if nominal else None
    print(f"\n{card}, torch {torch.__version__}: {config.num_hidden_layers} layers x {config.num_experts} experts "
          f"(top-{config.num_experts_per_tok}), {counts['total_params'] / 1e9:.2f}B parameters, "
          f"{counts['active_params'] / 1e9:.2f}B active; batch {args.batch} x {args.seq_len}; "
          f"{flops / 1e12:.1f} TFLOP per step\n")
    print(table_head("loop", "step", "TFLOP/s", "MFU vs measured bf16 mm", "MFU vs nominal bf16", align="lrrrr"))
    for name in ("stack", "plain"):
        r = results[name]
        vs_measured = f"{r['mfu_measured']:.1%}" if measured else "-"
        vs_nominal = f"{r['mfu_nominal']:.1%}" if nominal else "-"
        print(f"| {name} | {r['step_s'] * 1e3:.0f} ms | {r['tflops']:.1f} | {vs_measured} | {vs_nominal} |")
    print(f"\nstack / plain throughput: {results['stack_over_plain']:.3f}")
    if measured:
        print(f"bf16 torch.mm 16384^3: {measured:.0f} TFLOP/s measured; nominal: {nominal or 'unknown'}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
