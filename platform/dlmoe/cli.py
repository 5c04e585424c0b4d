"""The ``dlmoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dlmoe import __version__
from dlmoe.errors import DlmoeError

if TYPE_CHECKING:  # the sampler (torch) is imported by the commands that decode, not by every command
    from dlmoe.diffusion import GenerationSettings


def _check_tracking_uri(uri: str, where: str) -> str:
    """``uri`` when MLflow has a tracking store for its scheme; else a ``DlmoeError`` naming it and ``where`` it came
    from, raised before anything starts (MLflow itself fails only when the first call reaches the store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # the registry MlflowClient asks

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException as exc:
        scheme = uri.partition("://")[0]
        raise DlmoeError(f"unsupported MLflow tracking URI '{uri}' ({where}): MLflow has no store for scheme "
                         f"'{scheme}'; use e.g. sqlite:///mlflow.db, http://HOST:5000 or a folder") from exc
    return uri


def _flag_tracking_uri(flag: str | None) -> str:
    """The tracking URI of a ``--tracking-uri`` flag (``default_tracking_uri``), checked by ``_check_tracking_uri``."""
    from dlmoe.tracking import default_tracking_uri

    return _check_tracking_uri(default_tracking_uri(flag), "--tracking-uri" if flag else "MLFLOW_TRACKING_URI")


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
    from pathlib import Path

    from dlmoe.config import load_job_config
    from dlmoe.train.driver import run_training, show_sample

    job = load_job_config(args.job, args.overrides)
    if job.tracking.enabled:
        from dlmoe.tracking import tracking_uri

        _check_tracking_uri(tracking_uri(job), "tracking.uri" if job.tracking.uri else "MLFLOW_TRACKING_URI")
    print(f"# resolved job configuration ({args.job or 'embedded default jobs/debug.yaml'})")
    print(job.to_yaml())
    result = run_training(job, progress=not args.no_progress, verbose=args.verbose)
    if args.summary_json:
        Path(args.summary_json).write_text(result.to_json())
    losses = result.losses
    print(f"run {result.run_name}: {result.final_step} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"{result.restarts} restarts; checkpoints under {job.checkpoint.storage}/{job.run_name}/")
    if result.val_losses:
        step, val = result.val_losses[-1]
        baseline = "" if result.unigram_baseline is None else (
            f"; a model that ignores context scores {result.unigram_baseline:.4f} there (held-out unigram "
            f"cross-entropy)")
        print(f"validation loss at step {step:.0f}: {val:.4f} nats/token{baseline}")
    if result.mlflow_run_id:
        print(f"MLflow run {result.mlflow_run_id} at {result.tracking_uri} (mlflow ui --backend-store-uri "
              f"{result.tracking_uri})")
    if result.export:
        print(f"Hugging Face folder: {result.export}")
        sample = show_sample(result.export)
        if sample is not None:
            print(f"sample (prompt 'def '): {sample!r}")
    return 0


def _add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The sampler's settings, as ``generate`` and ``eval`` take them (``_sampler_settings`` reads them back)."""
    parser.add_argument("--gen-length", type=int, default=64, help="answer length in tokens (default 64)")
    parser.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block (default 32)")
    parser.add_argument("--steps", type=int, default=None,
                        help="forward passes in all for low-confidence remasking (default: gen-length)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="confidence-threshold parallel decoding: commit every token above it (e.g. 0.9)")
    parser.add_argument("--temperature", type=float, default=0.0, help="Gumbel sampling temperature (default 0)")


def _sampler_settings(args: argparse.Namespace) -> GenerationSettings:
    """The ``GenerationSettings`` of ``_add_sampler_flags``' flags (and ``generate``'s EOS flags, where given)."""
    from dlmoe.diffusion import GenerationSettings

    settings = GenerationSettings(
        gen_length=args.gen_length, block_length=args.block_length,
        steps=args.gen_length if args.steps is None else args.steps, threshold=args.threshold,
        temperature=args.temperature, stop_at_eos=not getattr(args, "no_stop_at_eos", False),
        suppress_eos=getattr(args, "suppress_eos", False), seed=args.seed)
    settings.check()  # before any model loads
    return settings


def _decode_as_trained(settings: GenerationSettings, facts: dict[str, object]) -> None:
    """A model trained with block diffusion (its dlmoe.json's ``training.block_size``) decodes block-causally."""
    import warnings

    training = facts.get("training")
    block = int(training.get("block_size", 0)) if isinstance(training, dict) else 0
    if block:
        settings.block_causal = True
        if settings.block_length != block:
            warnings.warn(f"the model was trained with blocks of {block} tokens; decoding with --block-length "
                          f"{settings.block_length}", stacklevel=2)


def _generate(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tqdm import tqdm

    from data_pipeline.tokenizers import TOKENIZER_FILE, load_tokenizer
    from dlmoe.diffusion import generate
    from dlmoe.errors import DataError
    from dlmoe.export import load_pretrained, read_dlmoe_facts

    settings = _sampler_settings(args)
    folder = Path(args.model_dir)
    model = load_pretrained(folder, device=args.device)
    _decode_as_trained(settings, read_dlmoe_facts(folder))
    config = model.config
    if not (folder / TOKENIZER_FILE).is_file():
        raise DataError(f"model folder {folder} has no {TOKENIZER_FILE}: text prompts need the tokenizer saved with "
                        f"the model")
    tokenizer = load_tokenizer(folder, eos_id=config.eos_token_id, pad_id=config.pad_token_id,
                               mask_id=config.mask_token_id)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    total = settings.steps if settings.threshold is None else None
    with tqdm(total=total, desc="forward passes", unit="pass", disable=args.no_progress or args.json,
              file=sys.stderr) as bar:
        started = time.perf_counter()
        result = generate(model, prompts, settings, mask_id=config.mask_token_id, eos_id=config.eos_token_id,
                          pad_id=config.pad_token_id, on_forward=lambda _: bar.update(1))
        seconds = time.perf_counter() - started
    texts = [tokenizer.decode(answer) for answer in result.answers]
    rate = result.generated_tokens / seconds if seconds > 0 else float("inf")
    if args.json:
        print(json.dumps({"answers": texts, "answer_ids": result.answers, "forward_passes": result.forward_passes,
                          "generated_tokens": result.generated_tokens, "seconds": seconds,
                          "tokens_per_second": rate}, indent=2))
    else:
        for text in texts:
            print(text)
        print(f"{result.generated_tokens} tokens in {result.forward_passes} forward passes, {seconds:.2f} s "
              f"({rate:.1f} tokens/s)", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dlmoe.evaluation import load_for_eval
    from dlmoe.evaluation.runner import EvalRequest, check_tasks, list_tasks, log_results, resolve_run, run_evaluation

    if args.list_tasks:
        print("\n".join(list_tasks(args.include_path)))
        return 0
    if args.model_dir is None or args.tasks is None:
        raise DlmoeError("dlmoe eval needs MODEL_DIR and --tasks (or --list-tasks)")
    settings = _sampler_settings(args)
    request = EvalRequest(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], generation=settings,
                          jsonl=args.jsonl, limit=args.limit, mc_samples=args.mc_samples,
                          mc_batch_size=args.mc_batch_size, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          include_path=args.include_path, check_greedy=not args.no_greedy_check,
                          progress=not args.no_progress)
    manager = check_tasks(request)
    tracking_uri = _flag_tracking_uri(args.tracking_uri)
    loaded = load_for_eval(args.model_dir, device=args.device)
    # Without a tracking URI or run id, a missing default store means there is no run to find: do not create one.
    local_default = args.tracking_uri is None and tracking_uri.startswith("sqlite:///") and \
        not Path(tracking_uri.removeprefix("sqlite:///")).exists()
    run_id = None if local_default and args.run_id is None else resolve_run(tracking_uri, args.run_id, loaded)
    document = run_evaluation(loaded, request, manager)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(document, indent=2))
    if run_id is not None:
        document["mlflow"] = {"tracking_uri": tracking_uri, "run_id": run_id,
                              "artifact": log_results(tracking_uri, run_id, document)}
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    for task, metrics in document["tasks"].items():
        for metric, value in metrics.items():
            print(f"{task:<24} {metric:<28} {value if isinstance(value, int) else f'{value:.4f}'}")
    if "mlflow" in document:
        print(f"logged to MLflow run {run_id} at {tracking_uri} ({document['mlflow']['artifact']})", file=sys.stderr)
    else:
        print("not logged to MLflow: the folder names no training run found there (--run-id, --tracking-uri)",
              file=sys.stderr)
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.tokenize import TokenizeSpec, run_tokenize

    spec = TokenizeSpec(output=args.output, seq_len=args.seq_len, inputs=args.input or [], tokenizer=args.tokenizer,
                        fmt=args.format, text_field=args.text_field, sft=args.sft, overwrite=args.overwrite,
                        endpoint_url=args.endpoint_url, unit_bytes=int(args.unit_mb * 2**20),
                        validation_fraction=args.validation_fraction)
    manifest = run_tokenize(spec, progress=not args.no_progress)
    print(f"{args.output}: {manifest.rows} rows of {manifest.seq_len} tokens ({manifest.tokens} tokens) in "
          f"{len(manifest.shards)} shards from {manifest.stats.get('documents', 0)} documents "
          f"({len(manifest.source)} files); tokenizer {manifest.tokenizer['name']}")
    if args.validation_fraction:
        from data_pipeline.shards import HELDOUT_FOLDER, read_manifest

        held_uri = f"{args.output.rstrip('/')}/{HELDOUT_FOLDER}"
        held = read_manifest(held_uri, endpoint_url=args.endpoint_url)
        print(f"{held_uri}: held out {held.rows} rows from {held.stats.get('documents', 0)} documents "
              f"(data.validation=heldout evaluates it)")
    if manifest.stats.get("sft_examples_too_long"):
        print(f"warning: {manifest.stats['sft_examples_too_long']} SFT examples longer than seq_len "
              f"{manifest.seq_len} were skipped", file=sys.stderr)
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from data_pipeline.shards import verify

    manifest, problems = verify(args.uri, endpoint_url=args.endpoint_url)
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        print(f"{args.uri}: {len(problems)} of {len(manifest.shards)} shards failed verification", file=sys.stderr)
        return 1
    print(f"{args.uri}: all {len(manifest.shards)} shards verified ({manifest.rows} rows, sha256 and size match)")
    return 0


def _data_info(args: argparse.Namespace) -> int:
    from data_pipeline.shards import read_manifest, size_problems

    manifest = read_manifest(args.uri, endpoint_url=args.endpoint_url)
    problems = size_problems(manifest, args.uri, endpoint_url=args.endpoint_url)  # one listing, no shard read
    report = {"uri": args.uri, "kind": manifest.kind, "rows": manifest.rows, "tokens": manifest.tokens,
              "seq_len": manifest.seq_len, "shards": len(manifest.shards),
              "bytes": sum(s.bytes for s in manifest.shards), "tokenizer": manifest.tokenizer,
              "sources": len(manifest.source), "stats": manifest.stats, "format_version": manifest.format_version,
              "doc_ids": manifest.doc_ids, "attention": manifest.attention_note, "size_problems": problems}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        tok = manifest.tokenizer
        print(f"{args.uri}: {manifest.kind} data, {manifest.rows} rows x {manifest.seq_len} = {manifest.tokens} "
              f"tokens in {len(manifest.shards)} shards ({report['bytes'] / 2**20:.1f} MiB)\n"
              f"tokenizer {tok.get('name')} (fingerprint {str(tok.get('fingerprint'))[:12]}, vocab "
              f"{tok.get('vocab_size')}, eos {tok.get('eos_id')}, pad {tok.get('pad_id')}, mask {tok.get('mask_id')})"
              f"\nfrom {len(manifest.source)} input files; {json.dumps(manifest.stats)}\n"
              f"format version {manifest.format_version}: {manifest.attention_note}\n"
              f"shards: {f'{len(problems)} of {len(manifest.shards)}' if problems else 'all'} sizes "
              f"{'differ from' if problems else 'match'} the manifest; contents not read (dlmoe data verify "
              f"{args.uri} reads them)")
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    return 1 if problems else 0


def _export(args: argparse.Namespace) -> int:
    from dlmoe.export.checkpoint import export_checkpoint
    from dlmoe.tracking import register_model_version

    # Checked before the folder is written: a refused registry must not leave an export behind.
    registry = _flag_tracking_uri(args.tracking_uri) if args.register else ""
    result = export_checkpoint(args.source, args.out, dtype=args.dtype, endpoint_url=args.endpoint_url)
    report = dict(result.__dict__)
    if args.register:
        report["registered_version"] = register_model_version(
            registry, args.register, result.uri,
            tags={"dlmoe.step": str(result.step), "dlmoe.checkpoint": result.checkpoint})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"exported step {result.step} of {result.checkpoint}\n  to {result.uri}: {result.tensors} tensors, "
              f"{result.bytes / 2**20:.1f} MiB")
        if args.register:
            print(f"  registered as {args.register} version {report['registered_version']}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    import os

    from dlmoe.monitor.dashboard import serve
    from dlmoe.monitor.store import require_existing

    if args.imbalance_threshold <= 1.0:
        raise DlmoeError(f"--imbalance-threshold is a max/mean token share and must exceed 1 (1 is perfect "
                         f"balance), got {args.imbalance_threshold}")
    if args.refresh_seconds <= 0:
        raise DlmoeError(f"--refresh-seconds must be positive, got {args.refresh_seconds}")
    if not 0 <= args.port <= 65535:
        raise DlmoeError(f"--port must lie in 0-65535 (0 picks a free one), got {args.port}")
    uri = _flag_tracking_uri(args.tracking_uri)
    require_existing(uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI"
                     if os.environ.get("MLFLOW_TRACKING_URI") else "the default store in the working directory")
    try:
        serve(uri, args.host, args.port, args.imbalance_threshold, args.refresh_seconds)
    except OSError as exc:
        raise DlmoeError(f"the dashboard cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    except KeyboardInterrupt:
        print("dlmoe dashboard: stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlmoe", description="Train LLaDA-MoE masked-diffusion models.")
    parser.add_argument("--version", action="version", version=f"dlmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and geometry of a model flavor")
    info.add_argument("--flavor", default="debug", help="debug, tiny or llada-moe-7b-a1b (default: debug)")
    info.add_argument("--json", action="store_true", help="print a JSON report")
    info.set_defaults(func=_info)

    train = sub.add_parser("train", help="train a job with Ray Train + DeepSpeed (local Ray, or the cluster in force)")
    train.add_argument("job", nargs="?", default=None, help="job YAML (default: the embedded jobs/debug.yaml)")
    train.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.steps=50")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.add_argument("--verbose", action="store_true",
                       help="show what Ray, Ray Train, DeepSpeed and MLflow print (kept in Ray's logs otherwise)")
    train.add_argument("--summary-json", default=None, metavar="PATH",
                       help="write {run_name, final_step, losses, params_sha256, restarts, checkpoints} here")
    train.set_defaults(func=_train)

    gen = sub.add_parser("generate", help="generate text from a saved Hugging Face model folder")
    gen.add_argument("model_dir", help="a folder written by dlmoe export / save_pretrained, with its tokenizer")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text; repeat it for a batch")
    _add_sampler_flags(gen)
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    gen.add_argument("--no-stop-at-eos", action="store_true", help="decode every block even after an EOS")
    gen.add_argument("--suppress-eos", action="store_true", help="never generate EOS")
    gen.add_argument("--device", default="cpu", help="torch device (default cpu)")
    gen.add_argument("--json", action="store_true", help="print a JSON report")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="score a saved model folder: lm-evaluation-harness tasks, the JSONL quick check")
    ev.add_argument("model_dir", nargs="?", default=None, help="a folder written by dlmoe export, with its tokenizer")
    ev.add_argument("--tasks", default=None, metavar="T1,T2",
                    help="comma-separated: 'quick' (exact match on --jsonl) and lm_eval task names")
    ev.add_argument("--jsonl", default=None, metavar="PATH", help='the quick check\'s {"prompt", "answer"} lines')
    ev.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for lm_eval tasks")
    ev.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra lm_eval task YAMLs")
    ev.add_argument("--list-tasks", action="store_true", help="print every task name and exit")
    _add_sampler_flags(ev)
    ev.add_argument("--mc-samples", type=int, default=64, help="Monte-Carlo draws per log-likelihood (default 64)")
    ev.add_argument("--mc-batch-size", type=int, default=32, help="draws per forward pass (default 32)")
    ev.add_argument("--no-greedy-check", action="store_true",
                    help="skip decoding continuations to answer lm_eval's is_greedy (then always false)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampling and Monte-Carlo noise")
    ev.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ev.add_argument("--output-json", default=None, metavar="PATH", help="write the results document here")
    ev.add_argument("--tracking-uri", default=None,
                    help="MLflow holding the checkpoint's run (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    ev.add_argument("--run-id", default=None, help="log into this MLflow run (default: the folder's training run)")
    ev.add_argument("--json", action="store_true", help="print the results document")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ev.set_defaults(func=_eval)

    exp = sub.add_parser("export", help="a training checkpoint (any expert-parallel size) → a Hugging Face folder")
    exp.add_argument("source", help="a checkpoint folder, or a run folder {checkpoint.storage}/{run_name} (its newest "
                                    "checkpoint that verifies); local or s3://")
    exp.add_argument("--out", required=True, metavar="URI", help="the model folder to write, local or s3://")
    exp.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="weight dtype (default: as trained)")
    exp.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    exp.add_argument("--register", default=None, metavar="NAME",
                     help="register the folder as a new version of this MLflow registered model")
    exp.add_argument("--tracking-uri", default=None,
                     help="MLflow for --register (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    exp.add_argument("--json", action="store_true", help="print a JSON report")
    exp.set_defaults(func=_export)

    tok = sub.add_parser("tokenize", help="tokenize a corpus into parquet shards + manifest.json (a Ray Data job)")
    tok.add_argument("--input", nargs="+", action="extend", metavar="URI",
                     help="files or folders, local or s3:// (default: the Python standard library's sources)")
    tok.add_argument("--output", required=True, metavar="URI", help="dataset folder, local or s3://")
    tok.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    tok.add_argument("--tokenizer", default=None, help="tokenizer.json or a folder holding one (default: bytes)")
    tok.add_argument("--format", choices=("text", "jsonl", "parquet"), default="text",
                     help="text: one document per file; jsonl: one per line; parquet: one per row")
    tok.add_argument("--text-field", default="text", help="jsonl / parquet field holding the text")
    tok.add_argument("--sft", action="store_true", help="jsonl prompt/response or chat messages, one row each")
    tok.add_argument("--overwrite", action="store_true", help="replace a different dataset at --output")
    tok.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    tok.add_argument("--unit-mb", type=float, default=32.0, help="input MiB per shard-writing task (default 32)")
    tok.add_argument("--validation-fraction", type=float, default=0.0, metavar="F",
                     help="hold out this fraction of the documents (chosen by a hash of their text) as a dataset "
                          "of its own in OUTPUT/validation (data.validation=heldout)")
    tok.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    tok.set_defaults(func=_tokenize)

    dash = sub.add_parser("dashboard", help="the expert-load dashboard: a read-only web app over an MLflow store")
    dash.add_argument("--tracking-uri", default=None,
                      help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8265, help="port (default 8265; 0 picks a free one)")
    dash.add_argument("--imbalance-threshold", type=float, default=2.0,
                      help="flag a run whose max/mean expert token share exceeds this (default 2.0)")
    dash.add_argument("--refresh-seconds", type=float, default=10.0,
                      help="how often a live run's page checks for new data (default 10)")
    dash.set_defaults(func=_dashboard)

    data = sub.add_parser("data", help="inspect and verify tokenized datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    verify = data_sub.add_parser("verify", help="check every shard against the manifest (exit 1 naming bad ones)")
    info_cmd = data_sub.add_parser("info", help="summary of a dataset: rows, tokens, seq_len, tokenizer, shards")
    for command in (verify, info_cmd):
        command.add_argument("uri", help="dataset folder, local or s3://")
        command.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    info_cmd.add_argument("--json", action="store_true", help="print a JSON report")
    verify.set_defaults(func=_data_verify)
    info_cmd.set_defaults(func=_data_info)
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


def run() -> None:
    """The ``dlmoe`` command: ``main``, then S3 released before the interpreter exits (``storage.release_s3``)."""
    try:
        code = main()
    finally:
        from data_pipeline.storage import release_s3

        release_s3()
    sys.exit(code)


if __name__ == "__main__":
    run()
