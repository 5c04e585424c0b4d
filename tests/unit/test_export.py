"""The Hugging Face format: release key names and config.json fields, sharded folders that round-trip to identical
logits for every flavor option, and clear errors for folders we cannot honour."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_pipeline.tokenizers import byte_tokenizer, load_tokenizer
from dlmoe.errors import ConfigError, ExportError
from dlmoe.export import (
    config_from_hf,
    config_to_hf,
    hf_tensor_shapes,
    load_pretrained,
    read_dlmoe_facts,
    save_pretrained,
    to_hf,
    verify_folder,
    write_folder,
)
from dlmoe.model import DiffusionMoE, build_model, get_flavor

from .naive_reference import naive_forward

OPTIONS = {
    "gqa": {},
    "shared-expert-dense-layer": {"num_hidden_layers": 3, "moe_layer_freq": [0, 1, 1],
                                  "shared_expert_intermediate_size": 40},
    "partial-rotary-mha": {"partial_rotary_factor": 0.5, "num_key_value_heads": 4, "rope_theta": 50000.0},
    "tied-no-qk-norm-clip": {"tie_word_embeddings": True, "qk_layernorm": False, "clip_qkv": 0.5},
}


def make_model(seed: int = 0, **changes: object) -> DiffusionMoE:
    cfg = dataclasses.replace(get_flavor("debug"), **changes)  # type: ignore[arg-type]
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def ids(batch: int = 2, length: int = 23) -> torch.Tensor:
    return torch.randint(0, 259, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_save_load_round_trip_gives_identical_logits(option: str, tmp_path: Path) -> None:
    model = make_model(**OPTIONS[option])
    folder = save_pretrained(model, tmp_path / "hf", max_shard_bytes=150_000, flavor="debug", step=12,
                             source_run="unit")
    loaded = load_pretrained(folder)
    with torch.no_grad():
        expected = model(ids()).logits
        assert torch.equal(loaded(ids()).logits, expected)
        # The stored tensors, read by release key names, give the same logits through the naive reference.
        stored = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        torch.testing.assert_close(naive_forward(loaded.config, stored, ids()), expected, rtol=1e-5, atol=1e-5)
    assert loaded.config == model.config
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_folder_layout_index_and_facts(tmp_path: Path) -> None:
    model = make_model()
    folder = save_pretrained(model, tmp_path / "hf", max_shard_bytes=100_000, flavor="debug", step=3,
                             source_run="run-a", tokenizer=byte_tokenizer())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    expected_keys = hf_tensor_shapes(model.config)
    assert set(index["weight_map"]) == set(expected_keys)
    total = 0
    for shard in shards:
        tensors = load_file(shard)
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in expected_keys
    facts = read_dlmoe_facts(folder)
    assert facts["mask_token_id"] == 258 and facts["flavor"] == "debug" and facts["step"] == 3
    assert facts["source_run"] == "run-a"
    assert load_tokenizer(folder).special.mask == 258


def test_config_json_carries_the_release_fields() -> None:
    config = config_to_hf(get_flavor("llada-moe-7b-a1b"), torch.bfloat16)
    release = {
        "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "expert_intermediate_size": 1024,
        "shared_expert_intermediate_size": None, "dense_intermediate_size": 8192, "moe_layer_freq": [1] * 16,
        "vocab_size": 157184, "max_position_embeddings": 8192, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "qk_layernorm": True, "norm_topk_prob": False, "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False, "attention_bias": False, "tie_word_embeddings": False,
        "clip_qkv": None, "router_aux_loss_coef": 0.01, "eos_token_id": 156892, "torch_dtype": "bfloat16",
        "architectures": ["LLaDAMoEModelLM"], "model_type": "lladamoe",
    }
    assert {k: config[k] for k in release} == release
    assert config["auto_map"]["AutoConfig"] == "configuration_lladamoe.LLaDAMoEConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_lladamoe.LLaDAMoEModelLM"
    assert "mask_token_id" not in config
    # A release folder without dlmoe.json gets the release's mask id.
    assert config_from_hf(config, "config.json", mask_token_id=None).mask_token_id == 156895


def test_release_geometry_key_count_without_allocating() -> None:
    shapes = hf_tensor_shapes(get_flavor("llada-moe-7b-a1b"))
    # per layer: 2 norms, q/k/v/o, q_norm, k_norm, the router, 64 experts × 3
    assert len(shapes) == 3 + 16 * (8 + 1 + 64 * 3)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total == 7356880896


def test_bfloat16_export(tmp_path: Path) -> None:
    model = make_model()
    folder = save_pretrained(model, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(folder)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_overwrites_a_model_folder_but_not_other_files(tmp_path: Path) -> None:
    first, second = make_model(seed=1), make_model(seed=2)
    save_pretrained(first, tmp_path / "hf", max_shard_bytes=100_000)
    save_pretrained(second, tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == 1
    assert torch.equal(load_pretrained(tmp_path / "hf").lm_head.weight, second.lm_head.weight)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a model folder"):
        save_pretrained(first, tmp_path / "notes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes"]


def _rewrite_single_shard(folder: Path, edit: dict[str, torch.Tensor | None]) -> None:
    (shard,) = folder.glob("model-*.safetensors")
    tensors = load_file(shard)
    for key, value in edit.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = dict.fromkeys(tensors, shard.name)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize(("edit", "message"), [
    ({"model.layers.0.mlp.experts.3.up_proj.weight": None}, r"1 missing: model\.layers\.0\.mlp\.experts\.3\.up_proj"),
    ({"model.layers.0.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)},
     r"1 unexpected: model\.layers\.0\.mlp\.experts\.8\.up_proj"),
    ({"model.norm.weight": torch.ones(65)}, r"wrong shape: model\.norm\.weight \(65,\) \(expected \(64,\)\)"),
])
def test_bad_tensors_are_named(edit: dict[str, torch.Tensor | None], message: str, tmp_path: Path) -> None:
    folder = save_pretrained(make_model(), tmp_path / "hf")
    _rewrite_single_shard(folder, edit)
    with pytest.raises(ExportError, match=message):
        load_pretrained(folder)


def test_index_pointing_at_a_missing_shard(tmp_path: Path) -> None:
    folder = save_pretrained(make_model(), tmp_path / "hf", max_shard_bytes=100_000)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ExportError, match=f"{victim.name} is listed in model.safetensors.index.json"):
        load_pretrained(folder)


@pytest.mark.parametrize(("change", "key"), [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias"),
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"norm_topk_prob": True}, "norm_topk_prob"),
    ({"num_experts": "64"}, "num_experts"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_fields_we_cannot_honour_are_named(change: dict[str, object], key: str, tmp_path: Path) -> None:
    folder = save_pretrained(make_model(), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=f"key '{key}'.*config.json"):
        load_pretrained(folder)


def test_missing_field_unknown_field_and_unknown_mask_id(tmp_path: Path) -> None:
    config = config_to_hf(get_flavor("debug"), torch.float32)
    with pytest.raises(ConfigError, match="key 'moe_layer_freq'"):
        config_from_hf({k: v for k, v in config.items() if k != "moe_layer_freq"}, "c.json", mask_token_id=258)
    with pytest.warns(UserWarning, match="ignoring config.json fields dlmoe does not know: fancy_new_field"):
        config_from_hf({**config, "fancy_new_field": 1}, "c.json", mask_token_id=258)
    with pytest.raises(ConfigError, match="mask token id is unknown"):
        config_from_hf(config, "c.json", mask_token_id=None)


def test_semantics_the_release_cannot_express_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="norm_topk_prob=true cannot be exported"):
        save_pretrained(make_model(norm_topk_prob=True), tmp_path / "a")
    model = make_model()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.selection_bias_E[2] = 0.1  # type: ignore[index]
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.gate\.selection_bias_E is non-zero"):
        save_pretrained(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_to_hf_names_every_global_expert_once() -> None:
    model = make_model()
    hf = to_hf(model.state_dict(), model.config)
    fused = model.model.layers[0].mlp.experts.gate_up_proj  # type: ignore[union-attr]
    for j in range(model.config.num_experts):
        assert torch.equal(hf[f"model.layers.0.mlp.experts.{j}.gate_proj.weight"], fused[j, :32])
        assert torch.equal(hf[f"model.layers.0.mlp.experts.{j}.up_proj.weight"], fused[j, 32:])
    assert not any("selection_bias" in k or "gate_up" in k for k in hf)


def test_a_failure_mid_export_publishes_nothing(tmp_path: Path) -> None:
    model = make_model()
    tensors = to_hf(model.state_dict(), model.config)
    written: list[str] = []

    def failing_source(names: list[str]) -> dict[str, torch.Tensor]:
        if written:
            raise OSError("No space left on device (injected)")
        written.extend(names)
        return {name: tensors[name] for name in names}

    with pytest.raises(OSError, match="injected"):
        write_folder(tmp_path / "out", model.config, failing_source, dtype=torch.float32, facts={},
                     max_shard_bytes=64 * 1024)
    assert written and not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


def test_verify_folder_catches_a_shard_that_lost_a_tensor(tmp_path: Path) -> None:
    model = make_model()
    folder = save_pretrained(model, tmp_path / "m", max_shard_bytes=64 * 1024)
    first = sorted(folder.glob("*.safetensors"))[0]
    kept = load_file(first)
    dropped = sorted(kept)[0]
    save_file({k: v for k, v in kept.items() if k != dropped}, str(first))
    with pytest.raises(ExportError, match=rf"{first.name} holds \['{dropped}'\] other than the index says"):
        verify_folder(folder, model.config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_shards_hold_exactly_the_bytes_given_views_and_ties_included(dtype: torch.dtype,
                                                                                 tmp_path: Path) -> None:
    model = make_model(tie_word_embeddings=True)
    tensors = to_hf(model.state_dict(), model.config)  # experts: views of the fused weights; lm_head: a tie
    folder = write_folder(tmp_path / "out", model.config, lambda names: {n: tensors[n] for n in names}, dtype=dtype,
                          facts={}, max_shard_bytes=100_000)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    read = {k: v for shard in shards for k, v in load_file(shard).items()}  # safetensors' own reader
    assert sorted(read) == sorted(tensors)
    for name, tensor in tensors.items():
        assert read[name].dtype == dtype and torch.equal(read[name], tensor.to(dtype)), name


def test_a_tensor_of_the_wrong_shape_is_named_and_nothing_is_published(tmp_path: Path) -> None:
    model = make_model()
    tensors = to_hf(model.state_dict(), model.config)
    bad = "model.layers.1.mlp.experts.3.down_proj.weight"
    tensors[bad] = tensors[bad][:, :-1]
    with pytest.raises(ExportError, match=rf"{bad} has shape \(64, 31\), the model's config says \(64, 32\)"):
        write_folder(tmp_path / "out", model.config, lambda names: {n: tensors[n] for n in names},
                     dtype=torch.float32, facts={})
    assert list(tmp_path.iterdir()) == []
