"""jobs/llada2-block.yaml (document-level attention, block diffusion under the block-level WSD schedule, the noise
range), shortened: it trains, a killed worker resumes from a checkpoint to the same losses and weights as an
uninterrupted run, the block size of every step reaches MLflow, and both exports (at the end, and `dlmoe export` of a
checkpoint) record the recipe while config.json stays the release's; `dlmoe generate` decodes it block-causally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_pipeline.tokenize import TokenizeSpec, run_tokenize
from dlmoe.cli import main
from dlmoe.config import JOBS_DIR, load_job_config
from dlmoe.export import load_pretrained
from dlmoe.train.driver import run_training

pytestmark = pytest.mark.usefixtures("ray_local")

TEXT = "def f{i}(x):\n    return x * {i} + {j}\n\nclass C{j}:\n    value = {i}\n"


def test_llada2_block_job_trains_resumes_and_exports(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # short documents: several per 64-token row
        (corpus / f"doc{i:02d}.txt").write_text(TEXT.format(i=i, j=i % 7))
    data = tmp_path / "data"
    manifest = run_tokenize(TokenizeSpec(output=str(data), seq_len=64, inputs=[str(corpus)]), progress=False)
    assert manifest.doc_ids
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    short = [f"data.uri={data}", "data.seq_len=64", "data.validation=''", "train.eval_every=0", "train.steps=6",
             "train.warmup_steps=1", "data.global_batch_size=4", "data.micro_batch_size=4",
             "parallel.num_workers=1", "parallel.ep_size=1", "parallel.zero_stage=0", "checkpoint.every_steps=2",
             "objective.block_schedule.warmup_steps=2", "objective.block_schedule.decay_steps=2",
             "objective.block_schedule.final_block_size=16", f"checkpoint.storage={tmp_path / 'runs'}",
             f"tracking.uri={db}", "train.log_every=1"]
    job = JOBS_DIR / "llada2-block.yaml"
    clean = run_training(load_job_config(job, [*short, "run_name=clean"]), progress=False)
    faulty = run_training(load_job_config(job, [*short, "run_name=faulty", "export.enabled=false",
                                                "fault_injection.rank=0", "fault_injection.step=3"]), progress=False)
    assert clean.final_step == faulty.final_step == 6 and clean.restarts == 0 and faulty.restarts >= 1
    assert faulty.losses == clean.losses and faulty.params_sha256 == clean.params_sha256

    client = MlflowClient(tracking_uri=db)
    experiment = client.get_experiment_by_name("dlmoe")
    assert experiment is not None
    run = client.search_runs([experiment.experiment_id],
                             filter_string="tags.`dlmoe.run_name` = 'clean'")[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "block_size"))
    # warm-up doublings 4, 8, 16, 32 in 2 steps; stable: full sequence (0); decay: 32 then 16
    assert [v for _, v in history] == [4, 16, 0, 0, 32, 16]

    hf = tmp_path / "runs" / "clean" / "hf"  # the export at the end of training
    by_hand = tmp_path / "by-hand"  # `dlmoe export` of the resumed run's newest checkpoint
    assert main(["export", str(tmp_path / "runs" / "faulty"), "--out", str(by_hand)]) == 0
    for folder in (hf, by_hand):
        facts = json.loads((folder / "dlmoe.json").read_text())
        assert facts["training"]["block_size"] == 16 and facts["training"]["document_attention"] is True
        assert facts["training"]["noise_range"] == [0.3, 0.8]
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LLaDAMoEModelLM"] and not any("block" in key for key in config)
    assert load_pretrained(hf).config.num_experts == 8
    assert main(["generate", str(hf), "--prompt", "def ", "--gen-length", "16", "--block-length", "16",
                 "--no-progress"]) == 0
