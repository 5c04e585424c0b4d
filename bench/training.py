"""Training throughput: the full stack (Ray Train + DeepSpeed) against a plain PyTorch loop of the same model, batch
and steps in one process; 2 workers with expert parallelism 2 against 1 worker; and the model FLOP utilisation of
a ``tiny`` step against the measured fp32 matmul peak.

What is measured (fp32, CPU):
1. The model and data of ``--job`` (default ``jobs/tiny.yaml``: 64 experts top-8) at ``--seq-len`` and global batch
   ``--batch`` on the default corpus tokenized byte-level, ``--steps`` optimizer steps:
   *plain*: one process, ``build_model`` + ``MaskedDiffusionObjective`` + ``torch.optim.AdamW`` + the WSD schedule
   + clipping, batches from ``TokenStream`` read in advance (so data loading is not timed); tokens/s over the second
   half of the steps, the window the workers report as their steady state;
   *engine*: the workers' own step (``parallelize`` + ``train_step``, a DeepSpeed engine in a one-rank gloo group)
   in this process without Ray, on batches read in advance and then streamed live by ``TokenStream``;
   *full stack*: ``run_training`` (a local Ray with 2 CPUs, ``parallel.num_workers`` 1 then 2 with ``ep_size`` 2,
   ZeRO-1, no mid-run checkpoints, no tracking, no export) — the workers' own steady-state tokens/s (the second
   half of the steps: the first ones share the cores with Ray's own actors starting up).
   With ``--repeats R`` the plain loop and the 1-worker full stack run R times, alternating; the table gives the
   medians, and the ratio is the median of the R pairs' ratios (all of them are printed).
2. MFU: one ``tiny`` training step (forward, loss, backward, AdamW) at batch 4 × 512, median of ``--iters`` after
   a warm-up; model FLOPs = 6 · active non-embedding parameters · tokens + attention (12 · layers · seq_len ·
   hidden · tokens); divided by the median fp32 ``torch.mm`` 2048³ rate measured in the same process.

Run (from the repository root):
    .venv/bin/python bench/training.py        # defaults: --job jobs/tiny.yaml --steps 40 --seq-len 256 --batch 8
    .venv/bin/python bench/training.py --repeats 3            # the headline ratio from 3 alternating pairs
    .venv/bin/python bench/training.py --json /tmp/training.json
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch
from benchutil import (
    CpuContention,
    bench_parser,
    matmul_peak_gflops,
    one_rank_group,
    table_head,
    train_step_flops,
    write_json,
)

from data_pipeline.stream import TokenStream
from dlmoe.config import load_job_config
from dlmoe.diffusion import MaskedDiffusionObjective, ObjectiveSettings
from dlmoe.model import build_model, count_parameters, get_flavor
from dlmoe.parallel import parallelize
from dlmoe.parallel.schedule import lr_at
from dlmoe.train.driver import prepare_dataset, run_training
from dlmoe.train.step import objective_settings, train_step


def plain_loop(job_file: str, overrides: list[str], steps: int) -> float:
    """Tokens/s of a one-process loop over the same model, data, objective and optimizer as the job."""
    job = load_job_config(job_file, [*overrides, "parallel.num_workers=1", "parallel.ep_size=1"])
    dataset = prepare_dataset(job, progress=False)
    stream = TokenStream(dataset, global_batch_size=job.data.global_batch_size, seed=job.data.seed,
                         max_batches=steps)
    batches = list(stream)
    config = job.model.to_model_config()
    torch.manual_seed(job.train.seed)
    model = build_model(config, seed=job.train.seed)
    t = job.train
    objective = MaskedDiffusionObjective(objective_settings(job))  # exactly the workers' objective
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    tokens, first = 0, 0.0
    measure_from = max(1, steps // 2)  # the workers' steady state: the second half of the steps
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr=t.lr, total_steps=steps, warmup_steps=t.warmup_steps,
                                schedule=t.schedule, min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)
        out = objective(model, torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["sample_index"]),
                        batch["epoch"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        if step + 1 == measure_from:
            first = time.perf_counter()
        elif step + 1 > measure_from:
            tokens += out.seq_len * len(batch["input_ids"])
    return tokens / (time.perf_counter() - first)


def engine_loop(job_file: str, overrides: list[str], steps: int, *, live: bool) -> float:
    """Tokens/s of the workers' own step (``parallelize`` + ``train_step``) in this process, without Ray (inside
    ``one_rank_group``): batches read in advance, or (``live``) streamed by ``TokenStream`` as a worker reads them."""
    job = load_job_config(job_file, [*overrides, "parallel.num_workers=1", "parallel.ep_size=1"])
    stream = TokenStream(prepare_dataset(job, progress=False), global_batch_size=job.data.global_batch_size,
                         seed=job.data.seed, max_batches=steps)
    batches = iter(stream) if live else iter(list(stream))
    engine = parallelize(build_model(job.model.to_model_config(), seed=job.train.seed), job)
    objective = MaskedDiffusionObjective(objective_settings(job))
    tokens, first = 0, 0.0
    measure_from = max(1, steps // 2)
    for step in range(steps):
        _, _, seen = train_step(engine, objective, next(batches), job.micro_batch_per_worker, job.accumulation_steps)
        if step + 1 == measure_from:
            first = time.perf_counter()
        elif step + 1 > measure_from:
            tokens += seen
    return tokens / (time.perf_counter() - first)


def tiny_mfu(iters: int, batch: int = 4, seq_len: int = 512) -> dict[str, float]:
    config = get_flavor("tiny")
    model = build_model(config, seed=0)
    objective = MaskedDiffusionObjective(ObjectiveSettings(mask_token_id=config.mask_token_id, seed=0,
                                                           global_batch_size=batch, variable_length_prob=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(iters + 1):
        start = time.perf_counter()
        out = objective(model, ids, torch.arange(step * batch, (step + 1) * batch), epoch=0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    flops = train_step_flops(model, batch, seq_len)
    seconds = statistics.median(times)
    peak = matmul_peak_gflops()
    return {"step_s": seconds, "gflops": flops / seconds / 1e9, "peak_gflops": peak,
            "mfu": flops / seconds / 1e9 / peak, "active_params": count_parameters(model)["active_params"],
            "tokens": batch * seq_len}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--job", default="jobs/tiny.yaml", help="the job whose model and data are trained")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch (one micro-batch per worker share)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="alternating plain / 1-worker full-stack pairs")
    args = parser.parse_args()
    storage = tempfile.mkdtemp(prefix="dlmoe-bench-train-")
    common = [f"train.steps={args.steps}", "train.warmup_steps=2", f"checkpoint.storage={storage}",
              f"checkpoint.every_steps={args.steps * 10}", "tracking.enabled=false", "export.enabled=false",
              f"data.seq_len={args.seq_len}", f"data.global_batch_size={args.batch}",
              f"data.micro_batch_size={args.batch}"]
    torch.set_num_threads(2)
    contention = CpuContention()
    def full_stack(workers: int, name: str) -> float:
        job = load_job_config(args.job, [*common, f"run_name={name}", f"parallel.num_workers={workers}",
                                         f"parallel.ep_size={workers}"])
        return run_training(job, progress=False).tokens_per_second

    pairs = [(plain_loop(args.job, common, args.steps), full_stack(1, f"bench-w1-{r}")) for r in range(args.repeats)]
    results: dict[str, Any] = {"plain_runs": [p for p, _ in pairs], "full_stack_w1_runs": [o for _, o in pairs],
                               "pair_ratios": [o / p for p, o in pairs],
                               "plain_tokens_per_s": statistics.median(p for p, _ in pairs),
                               "full_stack_w1_tokens_per_s": statistics.median(o for _, o in pairs)}
    with one_rank_group("gloo"):  # one group for both: DeepSpeed keeps the groups of the first it sees
        for live in (False, True):
            results[f"engine_{'live' if live else 'preread'}_tokens_per_s"] = engine_loop(args.job, common,
                                                                                          args.steps, live=live)
    results["full_stack_w2_tokens_per_s"] = full_stack(2, "bench-w2")
    results["tiny"] = tiny_mfu(args.iters)
    results["other_cores_busy"] = contention.others_cores()
    plain, one, two = (results[k] for k in ("plain_tokens_per_s", "full_stack_w1_tokens_per_s",
                                            "full_stack_w2_tokens_per_s"))
    tiny = results["tiny"]
    ratios = ", ".join(f"{r:.3f}" for r in results["pair_ratios"])
    print(f"\n{args.steps} steps of {args.job} ({args.batch} x {args.seq_len} tokens per step); torch "
          f"{torch.__version__}; processes other than this one (Ray workers included) kept "
          f"{results['other_cores_busy']:.2f} cores busy\n")
    print(table_head("run", "tokens/s", "ratio", align="lrr"))
    print(f"| plain PyTorch loop, one process | {plain:,.0f} | 1.00 |")
    for key, label in (("engine_preread", "DeepSpeed engine + `train_step`, one process, batches read in advance"),
                       ("engine_live", "the same, batches streamed by `TokenStream`")):
        rate = results[f"{key}_tokens_per_s"]
        print(f"| {label} | {rate:,.0f} | {rate / plain:.2f} |")
    print(f"| Ray Train + DeepSpeed, 1 worker | {one:,.0f} | {statistics.median(results['pair_ratios']):.2f} |")
    print(f"| Ray Train + DeepSpeed, 2 workers, EP 2 | {two:,.0f} | {two / plain:.2f} (× 1 worker: {two / one:.2f}) |")
    if args.repeats > 1:
        print(f"\n1 worker / plain, pair by pair ({args.repeats} alternating pairs; the table gives the medians): "
              f"{ratios}")
    print(f"\ntiny step (batch {tiny['tokens'] // 512} x 512): {tiny['step_s'] * 1e3:.0f} ms, {tiny['gflops']:.1f} "
          f"GFLOP/s of model FLOPs = {tiny['mfu']:.1%} of the {tiny['peak_gflops']:.0f} GFLOP/s fp32 matmul peak")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
