"""The seed's claim at small scale: at the same active parameters, is a native MoE masked-diffusion LM better than a
dense one? (issue 17; results in BENCHMARKS.md)

Three models trained with ``dlmoe train`` (one worker, the same data, tokens, schedule and seeds), each evaluated on
the same held-out text:

- ``dense``: the ``mini-dense`` flavor, every layer one SwiGLU MLP as wide as the 8 experts a token reaches;
- ``moe``: the ``mini-moe`` flavor, 64 experts top-8 at the release's ratios, Switch balance loss + z-loss;
- ``moe-aux-free``: the same MoE with aux-loss-free bias balancing instead of the Switch loss.

The corpus is the default one (the standard library's sources, byte-level) tokenized by the tokenize job with a
held-out split (``--validation-fraction``, by document). Per model: total / active parameters, training tokens,
wall time (the whole ``run_training`` call: Ray workers, validation included), the validation curve (the
fixed-noise diffusion loss every ``--eval-every`` steps), the held-out ELBO from ``dlmoe eval``'s estimator in bits
per token and per byte, the expert balance of the final weights on the held-out rows (worst layer's max/mean, dead
experts: at most a tenth of the fair share), and a sample. Baseline: the held-out unigram cross-entropy (a
context-free model's ELBO; nats/token over the whole held-out set, bits over the rows the ELBO scores). Writes
``quality.json`` and ``quality.png`` (the three validation curves against tokens) next to this script
(``--results``) and prints a Markdown table; the runs and the data go under ``--out``.

    nice -n 10 .venv/bin/python bench/quality.py      # the BENCHMARKS.md run
    .venv/bin/python bench/quality.py --steps 20 --eval-every 10 --elbo-rows 8 --mc-samples 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# (name, flavor, overrides of its own)
MODELS: list[tuple[str, str, list[str]]] = [
    ("dense", "mini-dense", []),
    ("moe", "mini-moe", []),
    ("moe-aux-free", "mini-moe", ["objective.balance.mode=aux_free"]),
]


@dataclass
class Settings:
    out: Path
    steps: int
    batch: int
    seq_len: int
    lr: float
    eval_every: int
    eval_batches: int
    elbo_rows: int
    mc_samples: int


def job_overrides(settings: Settings, name: str, flavor: str, extra: list[str], data: str) -> list[str]:
    """Every setting the comparison depends on, spelled out (nothing left to jobs/debug.yaml's values)."""
    s = settings
    return [
        f"run_name={name}", f"model.flavor={flavor}", f"data.uri={data}", "data.validation=heldout",
        f"data.seq_len={s.seq_len}", f"data.global_batch_size={s.batch}", f"data.micro_batch_size={s.batch}",
        "data.seed=1234", f"train.steps={s.steps}", f"train.lr={s.lr}", "train.schedule=wsd",
        f"train.warmup_steps={max(1, s.steps // 20)}", "train.decay_fraction=0.2", "train.min_lr_ratio=0.1",
        "train.weight_decay=0.1", "train.beta1=0.9", "train.beta2=0.95", "train.grad_clip=1.0", "train.seed=0",
        f"train.eval_every={s.eval_every}", f"train.eval_batches={s.eval_batches}", f"train.log_every={s.eval_every}",
        "objective.kind=pretrain", "objective.stratified_t=true", "objective.balance.aux_loss_coef=0.01",
        "objective.balance.z_loss_coef=0.001", "objective.balance.bias_update_rate=0.001",
        "parallel.num_workers=1", "parallel.ep_size=1", "parallel.zero_stage=0",
        f"checkpoint.storage={s.out / 'runs'}", f"checkpoint.every_steps={s.steps}", "export.enabled=false",
        "tracking.enabled=false", *extra,
    ]


def final_model(job: Any, checkpoint: str) -> Any:
    """The trained weights (one worker, no expert parallelism: DeepSpeed keeps the whole module in one file),
    aux-free selection bias included."""
    from dlmoe.model import build_model

    model = build_model(job.model.to_model_config())
    state = torch.load(Path(checkpoint) / "dlmoe" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    model.load_state_dict(state["module"], strict=True)
    return model.eval()


@torch.no_grad()
def expert_balance(model: Any, rows: np.ndarray) -> dict[str, float] | None:
    """Routing of the held-out rows by the final weights: the worst layer's max/mean load and the dead experts
    (share at most a tenth of 1/E) summed over layers; None for a dense model."""
    from dlmoe.model.balance import expert_load

    counts = None
    for lo in range(0, len(rows), 16):
        stats = model(torch.from_numpy(rows[lo:lo + 16]).long()).router_stats
        if not stats:
            return None
        step = torch.stack([s.tokens_per_expert_E for s in stats])
        counts = step if counts is None else counts + step
    assert counts is not None
    load = expert_load(counts, dead_fraction=0.1)
    return {"max_over_mean": float(load.max_over_mean.max()), "dead_experts": int(load.dead_experts.sum()),
            "experts": int(counts.numel())}


def sample(model: Any, tokenizer: Any, prompt: str = "def ", length: int = 64) -> str:
    """What ``dlmoe train`` prints at the end: low-confidence remasking, one token per forward pass."""
    from dlmoe.diffusion import GenerationSettings, generate

    config = model.config
    result = generate(model, [tokenizer.encode(prompt)], GenerationSettings(gen_length=length, block_length=length,
                                                                            steps=length),
                      mask_id=config.mask_token_id, eos_id=config.eos_token_id, pad_id=config.pad_token_id)
    return str(prompt + tokenizer.decode(result.answers[0]))


def train_and_measure(settings: Settings, name: str, flavor: str, extra: list[str], data: str,
                      heldout: str, heldout_rows: np.ndarray) -> dict[str, Any]:
    from data_pipeline.tokenizers import byte_tokenizer
    from dlmoe.config import load_job_config
    from dlmoe.evaluation.elbo import dataset_elbo
    from dlmoe.evaluation.loading import LoadedModel
    from dlmoe.model.transformer import count_parameters
    from dlmoe.train.driver import run_training

    overrides = job_overrides(settings, name, flavor, extra, data)
    job = load_job_config(None, overrides)
    started = time.perf_counter()
    result = run_training(job, progress=False)
    wall = time.perf_counter() - started
    model = final_model(job, result.checkpoints[-1])
    tokenizer = byte_tokenizer()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, folder=Path(result.checkpoints[-1]))
    elbo = dataset_elbo(loaded, heldout, limit=settings.elbo_rows, samples=settings.mc_samples, seed=0)
    tokens_per_step = settings.batch * settings.seq_len
    print(f"{name}: {wall:.0f} s, val {result.val_losses[-1][1]:.4f} nats/token, ELBO {elbo.bits_per_byte:.4f} "
          f"bits/byte", flush=True)
    return {
        "name": name, "flavor": flavor, "command": "dlmoe train " + " ".join(overrides),
        **count_parameters(model), "tokens": settings.steps * tokens_per_step, "wall_s": wall,
        "tokens_per_s": result.tokens_per_second,
        "val_curve": [[int(step) * tokens_per_step, float(loss)] for step, loss in result.val_losses],
        "elbo": elbo.metrics(), "balance": expert_balance(model, heldout_rows), "sample": sample(model, tokenizer),
    }


def plot(results: list[dict[str, Any]], unigram_nats: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in results:
        tokens, losses = zip(*run["val_curve"], strict=True)
        ax.plot([t / 1e6 for t in tokens], losses, marker="o", markersize=3, label=f"{run['name']} ({run['flavor']})")
    ax.axhline(unigram_nats, color="grey", linestyle="--", label="unigram (context-free)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out diffusion loss (nats/token)")
    ax.set_title("Same active parameters: dense vs MoE masked diffusion (2 CPU cores)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict[str, Any]], unigram: dict[str, float]) -> str:
    lines = ["| model | total params | active params | tokens | wall s | val loss (nats/tok) | ELBO bits/token | "
             "ELBO bits/byte | balance max/mean | dead experts |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b, e = r["balance"], r["elbo"]
        imbalance = "—" if b is None else f"{b['max_over_mean']:.2f}"
        dead = "—" if b is None else f"{b['dead_experts']} / {b['experts']}"
        lines.append(f"| {r['name']} (`{r['flavor']}`) | {r['total_params']:,} | {r['active_params']:,} | "
                     f"{r['tokens']:,} | {r['wall_s']:.0f} | {r['val_curve'][-1][1]:.3f} | "
                     f"{e['bits_per_token']:.3f} ± {e['stderr_bits_per_token']:.3f} | {e['bits_per_byte']:.3f} | "
                     f"{imbalance} | {dead} |")
    lines.append(f"| unigram (train frequencies) | — | — | — | — | {unigram['nats_per_token']:.3f} | "
                 f"{unigram['bits_per_token']:.3f} | {unigram['bits_per_byte']:.3f} | — | — |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "quality", help="runs and data")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent,
                        help="where quality.json and quality.png go")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows of --seq-len tokens)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=16, help="global batches in the validation set")
    parser.add_argument("--elbo-rows", type=int, default=128, help="held-out rows the final ELBO scores")
    parser.add_argument("--mc-samples", type=int, default=32, help="Monte-Carlo draws per row of the ELBO")
    args = parser.parse_args()
    settings = Settings(out=args.out.resolve(), steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                        eval_every=args.eval_every, eval_batches=args.eval_batches, elbo_rows=args.elbo_rows,
                        mc_samples=args.mc_samples)
    settings.out.mkdir(parents=True, exist_ok=True)

    from data_pipeline.baselines import cross_entropy_of_counts, heldout_unigram_cross_entropy, token_counts
    from data_pipeline.shards import HELDOUT_FOLDER, read_rows
    from data_pipeline.tokenize import TokenizeSpec, run_tokenize
    from data_pipeline.tokenizers import byte_tokenizer
    from dlmoe.evaluation.elbo import token_byte_lengths

    data = str(settings.out / "data" / f"stdlib-{settings.seq_len}")
    run_tokenize(TokenizeSpec(output=data, seq_len=settings.seq_len, validation_fraction=0.1), progress=False)
    heldout = f"{data}/{HELDOUT_FOLDER}"
    _, rows = read_rows(heldout, limit=settings.elbo_rows)
    # On the whole held-out set (what the validation curves estimate), and on the rows the ELBO scores.
    vocab = byte_tokenizer().vocab_size
    on_rows = cross_entropy_of_counts(token_counts(data, vocab_size=vocab),
                                      np.bincount(rows.reshape(-1), minlength=vocab)) / math.log(2)
    row_bytes = int(token_byte_lengths(byte_tokenizer())[rows].sum())
    unigram = {"nats_per_token": heldout_unigram_cross_entropy(data, heldout), "bits_per_token": on_rows,
               "bits_per_byte": on_rows * rows.size / row_bytes}

    results = [train_and_measure(settings, name, flavor, extra, data, heldout, rows.astype(np.int64))
               for name, flavor, extra in MODELS]
    args.results.mkdir(parents=True, exist_ok=True)
    shown = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    (args.results / "quality.json").write_text(json.dumps({"settings": shown, "unigram": unigram,
                                                           "models": results}, indent=1) + "\n")
    plot(results, unigram["nats_per_token"], args.results / "quality.png")
    print(table(results, unigram))
    for r in results:
        print(f"\n{r['name']} sample: {r['sample']!r}")
    print(f"\nwrote {args.results / 'quality.json'} and {args.results / 'quality.png'}")


if __name__ == "__main__":
    main()
