"""Sampler: confidence-threshold parallel decoding (Fast-dLLM) against one token per forward pass (LLaDA), on the
``debug`` model trained on the copy language, with identical outputs; and both against the block length.

What is measured: ``dlmoe.diffusion.generate`` on ``--prompts`` held-out prompts of the copy language
(``dlmoe.train.copy_task``; answer span 24 tokens: the 8-letter word then EOS), fp32 on CPU, ``stop_at_eos``
off so that every row decodes all 24 positions. First the model is trained in this process (300 steps, seed 0,
the same recipe as tests/unit/test_sampler.py). Then, for each row, all prompts are decoded one at a time
(batch 1, the usual latency setting) and as one batch; each is repeated ``--repeats`` times and the median wall
time kept. Reported per row: forward passes per prompt, tokens per forward pass (24 / passes), tokens/s at
batch 1 and at batch ``--prompts``, the speed-up over the baseline row (one token per pass, block 8), whether
every answer equals the baseline's, and the exact-answer rate against the truth. Rows run back to back in one
process; the cores other processes kept busy during the whole run are printed (the machine may be shared).

With ``--device cuda`` the model is trained on the CPU as above, then moved to the GPU (still fp32) for the
decoding; ``--smoke`` is a quick check of the script itself (5 training steps, 2 prompts, one repeat: the rows'
figures mean nothing).

Run (from the repository root):
    .venv/bin/python bench/sampler.py                       # defaults: --prompts 16 --repeats 3
    .venv/bin/python bench/sampler.py --json /tmp/sampler.json
    python3 bench/sampler.py --device cuda --json $OUT/sampler.json        # on a GPU machine
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from benchutil import CpuContention, bench_parser, synchronize, table_head, write_json

from dlmoe.diffusion import GenerationSettings, generate
from dlmoe.model.config import BYTE_EOS_ID, BYTE_MASK_ID, BYTE_PAD_ID
from dlmoe.train.copy_task import CopyTask, train_copy_model

IDS = {"mask_id": BYTE_MASK_ID, "eos_id": BYTE_EOS_ID, "pad_id": BYTE_PAD_ID}
ROWS: list[tuple[str, int, float | None]] = [
    # (label, block_length, threshold); threshold None = one token per forward pass (steps = gen_length)
    ("one token per pass, block 8 (baseline)", 8, None),
    ("one token per pass, block 24", 24, None),
    ("one token per pass, block 4", 4, None),
    ("threshold 0.9, block 24", 24, 0.9),
    ("threshold 0.9, block 12", 12, 0.9),
    ("threshold 0.9, block 8", 8, 0.9),
    ("threshold 0.9, block 4", 4, 0.9),
    ("threshold 0.7, block 8", 8, 0.7),
    ("threshold 0.99, block 8", 8, 0.99),
]


def timed(fn: Any, repeats: int, device: str) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where to decode: cpu (default) or cuda")
    parser.add_argument("--smoke", action="store_true", help="a quick check of the script: 5 training steps, "
                        "2 prompts, one repeat")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if args.smoke:
        args.prompts, args.repeats = 2, 1
    torch.manual_seed(0)

    task = CopyTask()
    started = time.perf_counter()
    model, losses = train_copy_model(task, steps=5 if args.smoke else 300)
    print(f"trained the debug model on the copy language: {len(losses)} steps in {time.perf_counter() - started:.1f} s,"
          f" final loss {statistics.mean(losses[-10:]):.4f}")
    model = model.to(args.device)
    prompts, truth = task.sample(args.prompts, torch.Generator().manual_seed(99))
    gen = task.answer_length
    contention = CpuContention()
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    for label, block, threshold in ROWS:
        settings = GenerationSettings(gen_length=gen, block_length=block, steps=gen, threshold=threshold,
                                      stop_at_eos=False)

        def one_at_a_time(s: GenerationSettings = settings) -> list[Any]:
            return [generate(model, [p], s, **IDS) for p in prompts]

        def batched(s: GenerationSettings = settings) -> Any:
            return generate(model, prompts, s, **IDS)

        single_s, singles = timed(one_at_a_time, args.repeats, args.device)
        batch_s, batch = timed(batched, args.repeats, args.device)
        answers = [r.answers[0] for r in singles]
        passes = statistics.mean(r.forward_passes for r in singles)
        row = {
            "row": label, "block_length": block, "threshold": threshold,
            "passes_per_prompt": passes, "tokens_per_pass": gen / passes,
            "tokens_per_s_batch1": gen * len(prompts) / single_s,
            "batch_passes": batch.forward_passes, "tokens_per_s_batched": gen * len(prompts) / batch_s,
            "exact": sum(a[:len(t)] == t and all(x == BYTE_EOS_ID for x in a[len(t):])
                         for a, t in zip(answers, truth, strict=True)) / len(truth),
            "batched_equals_single": batch.answers == answers,
        }
        if baseline is None:
            baseline = {**row, "answers": answers}
        row["same_as_baseline"] = answers == baseline["answers"]
        row["speedup_batch1"] = row["tokens_per_s_batch1"] / baseline["tokens_per_s_batch1"]
        row["speedup_batched"] = row["tokens_per_s_batched"] / baseline["tokens_per_s_batched"]
        rows.append(row)
    others = contention.others_cores()

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"\n{len(prompts)} prompts, answer span {gen} tokens, {where}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; other processes kept {others:.2f} cores busy\n")
    print(table_head("decoding", "passes / prompt", "tokens / pass", "tok/s batch 1", "×",
                     f"tok/s batch {len(prompts)}", "×", "same as baseline", "exact", align="lllllllll"))
    for r in rows:
        print(f"| {r['row']} | {r['passes_per_prompt']:.2f} | {r['tokens_per_pass']:.2f} | "
              f"{r['tokens_per_s_batch1']:.0f} | {r['speedup_batch1']:.2f} | {r['tokens_per_s_batched']:.0f} | "
              f"{r['speedup_batched']:.2f} | {'yes' if r['same_as_baseline'] else 'NO'} | {r['exact']:.0%} |")
    print(f"\nbatched answers equal the batch-1 answers in every row: "
          f"{'yes' if all(r['batched_equals_single'] for r in rows) else 'NO'}")
    write_json(args.json, {"device": where, "torch": torch.__version__, "training_steps": len(losses),
                           "final_loss": statistics.mean(losses[-10:]), "rows": rows, "other_cores_busy": others})


if __name__ == "__main__":
    main()
