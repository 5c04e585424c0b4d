"""Job configuration: every YAML in jobs/ loads and validates; bad input names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlmoe.config import JOBS_DIR, JobConfig, load_job_config
from dlmoe.errors import ConfigError

JOB_FILES = sorted(JOBS_DIR.glob("*.yaml"))


def test_jobs_folder_has_the_embedded_default_and_tiny() -> None:
    names = {p.name for p in JOB_FILES}
    assert {"debug.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_every_job_yaml_loads_and_validates(path: Path) -> None:
    job = load_job_config(path)
    assert isinstance(job, JobConfig)
    assert job.model.flavor in ("debug", "tiny", "llada-moe-7b-a1b")
    job.validate()


def test_default_is_debug_flavor() -> None:
    job = load_job_config()
    assert job.model.flavor == "debug"
    assert job.model.to_model_config().num_experts == 8


def test_flavor_seeds_model_section_and_yaml_overrides_it(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  flavor: tiny\n  num_experts: 32\n")
    job = load_job_config(path)
    assert job.model.hidden_size == 256
    assert job.model.num_experts == 32


def test_overrides_apply_and_depth_change_fills_moe_layer_freq() -> None:
    job = load_job_config(None, ["model.num_hidden_layers=3", "train.steps=70"])
    assert job.train.steps == 70
    assert job.model.moe_layer_freq == [1, 1, 1]


def test_explicit_moe_layer_freq_with_wrong_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        load_job_config(None, ["model.num_hidden_layers=3", "model.moe_layer_freq=[1,0]"])


def test_config_hash_and_yaml_reflect_values() -> None:
    a = load_job_config()
    b = load_job_config(None, ["train.lr=0.5"])
    assert a.config_hash() != b.config_hash()
    assert "lr: 0.5" in b.to_yaml()


@pytest.mark.parametrize(
    ("override", "key", "needle"),
    [
        ("model.num_expert=3", "model.num_expert", "not in"),
        ("model.num_experts=abc", "model.num_experts", "could not be converted"),
        ("foo.bar=1", "foo", "not in"),
        ("model.num_experts_per_tok=9", "model.num_experts_per_tok", "exceeds num_experts"),
        ("model.hidden_size=66", "model.num_attention_heads", "not divisible"),
        ("model.num_key_value_heads=3", "model.num_key_value_heads", "not divisible"),
        ("data.seq_len=4096", "data.seq_len", "max_position_embeddings"),
        ("model.flavor=nope", "model.flavor", "unknown flavor"),
        ("parallel.ep_size=3", "parallel.ep_size", "does not divide"),
        ("objective.kind=ar", "objective.kind", "must be one of"),
        ("parallel.num_workers=3", "data.global_batch_size", "not a multiple of parallel.num_workers 3"),
        ("data.micro_batch_size=3", "data.micro_batch_size", "not a multiple of its micro-batch 3"),
        ("fault_injection.rank=2", "fault_injection.rank", "is not a worker rank"),
        ("run_name=a/b", "run_name", "without '/'"),
        ("train.warmup_steps=-1", "train.warmup_steps", "must lie"),
        ("model.mask_token_id=9999", "model.mask_token_id", "outside the vocabulary"),
        ("objective.balance.mode=aux_free", "objective.balance.mode", "export.enabled=false"),
        ("model.norm_topk_prob=true", "model.norm_topk_prob", "export.enabled=false"),
        ("fault_injection.kind=sigkill", "fault_injection.kind", "must be one of kill, sigterm"),
        ("checkpoint.sigterm_grace_s=0", "checkpoint.sigterm_grace_s", "must be positive"),
        ("export.dtype=fp16", "export.dtype", "must be bf16, fp32 or empty"),
        ("export.every_n_checkpoints=-1", "export.every_n_checkpoints", "must be non-negative"),
        ("data.validation='' train.eval_every=5", "train.eval_every", "needs a held-out dataset in data.validation"),
        ("data.validation=held-out train.eval_every=0", "data.validation", "set train.eval_every"),
        ("train.eval_batches=0", "train.eval_batches", "must be positive"),
    ],
)
def test_bad_values_raise_config_error_naming_key(override: str, key: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_job_config(None, override.split())  # one override, or a few separated by spaces
    assert info.value.key == key
    assert info.value.source is not None
    assert key in str(info.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_job_config(path)
    assert info.value.key == "train.stepz"
    assert str(path) in str(info.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  seq_len: long\n")
    with pytest.raises(ConfigError) as info:
        load_job_config(path)
    assert info.value.key == "data.seq_len"
    assert str(path) in str(info.value)


def test_missing_file_and_malformed_override() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_job_config("/nonexistent/job.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_job_config(None, ["train.steps"])


def test_list_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_job_config(path)


def test_release_incompatible_balancing_is_fine_without_export() -> None:
    job = load_job_config(None, ["objective.balance.mode=aux_free", "model.norm_topk_prob=true",
                                 "export.enabled=false"])
    assert job.objective.balance.mode == "aux_free" and job.model.norm_topk_prob


def test_registering_exports_needs_tracking() -> None:
    with pytest.raises(ConfigError, match=r"needs tracking\.enabled=true") as info:
        load_job_config(None, ["export.register=m", "tracking.enabled=false"])
    assert info.value.key == "export.register"


def test_a_warmup_longer_than_the_run_becomes_a_tenth_of_it_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"train.warmup_steps=20 does not fit in train.steps=10; warming up over 1 "
                                         r"step \(a tenth of the run\)"):
        job = load_job_config(None, ["train.steps=10"])
    assert job.train.warmup_steps == 1
    with pytest.warns(UserWarning, match="over 0 steps"):
        assert load_job_config(None, ["train.steps=5", "train.warmup_steps=1000"]).train.warmup_steps == 0
    assert load_job_config(None, ["train.steps=30"]).train.warmup_steps == 20  # one that fits is kept
