"""The ``dlmoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dlmoe import __version__
from dlmoe.errors import DlmoeError


def _info(args: argparse.Namespace) -> int:
    from dlmoe.model import build_model, count_parameters, get_flavor

    config = get_flavor(args.flavor)
    model = build_model(config, device="meta")
    counts = count_parameters(model)
    report = {"flavor": args.flavor, **counts, "config": config.to_json_dict(),
              "mask_token_id": config.mask_token_id}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"flavor {args.flavor}: {counts['total_params'] / 1e9:.3f}B parameters, "
              f"{counts['active_params'] / 1e9:.3f}B active per token "
              f"({config.num_hidden_layers} layers, {config.num_experts} experts top-{config.num_experts_per_tok})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dlmoe.config import load_job_config
    from dlmoe.train.local import run_local_training

    job = load_job_config(args.job, args.overrides)
    print(f"# resolved job configuration ({args.job or 'embedded default jobs/debug.yaml'})")
    print(job.to_yaml())
    result = run_local_training(job, progress=not args.no_progress)
    first, last = result.losses[0], result.losses[-1]
    print(f"run {result.run_name}: {result.final_step} steps, loss {first:.4f} -> {last:.4f}, "
          f"{result.tokens_per_second:.0f} tokens/s; weights and summary in {result.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlmoe", description="Train LLaDA-MoE masked-diffusion models.")
    parser.add_argument("--version", action="version", version=f"dlmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and geometry of a model flavor")
    info.add_argument("--flavor", default="debug", help="debug, tiny or llada-moe-7b-a1b (default: debug)")
    info.add_argument("--json", action="store_true", help="print a JSON report")
    info.set_defaults(func=_info)

    train = sub.add_parser("train", help="train a job (single process until distributed training lands)")
    train.add_argument("job", nargs="?", default=None, help="job YAML (default: the embedded jobs/debug.yaml)")
    train.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.steps=50")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A bare key=value first argument is an override, not a job file.
    if getattr(args, "job", None) and "=" in args.job:
        args.overrides.insert(0, args.job)
        args.job = None
    try:
        code: int = args.func(args)
    except DlmoeError as exc:
        print(f"dlmoe: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
