"""The official LLaDA-MoE Hugging Face format (reference/lladamoe.md §3): state-dict adapters, config.json, and
reading model folders (writing them: writer.py).

A folder holds ``config.json`` (the release's fields and names), ``model-0000i-of-0000N.safetensors`` shards with
``model.safetensors.index.json``, the tokenizer files when known, and ``dlmoe.json`` with the facts config.json
does not carry (mask id, flavor, training step, source run). The release's modeling code loads such a folder and
computes the same logits as ``DiffusionMoE``.

dlmoe keeps each layer's experts fused (``mlp.experts.gate_up_proj`` [E, 2I, D], ``mlp.experts.down_proj``
[E, D, I], see model/moe.py); the release has one module per expert under its global index. ``to_hf`` splits,
``from_hf`` stacks. The aux-loss-free selection bias (``mlp.gate.selection_bias_E``) has no release counterpart
with the same meaning, so a model whose bias is non-zero is refused rather than exported with other semantics.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dlmoe.errors import ConfigError, ExportError
from dlmoe.model import DiffusionMoE, ModelConfig, build_model
from dlmoe.model.config import DLMOE_ONLY_FIELDS

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DLMOE_FILE = "dlmoe.json"
DLMOE_FORMAT_VERSION = 1

ARCHITECTURE = "LLaDAMoEModelLM"
MODEL_TYPE = "lladamoe"
AUTO_MAP = {
    "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}
# The release's mask id (reference §1); used for a release folder that comes without dlmoe.json.
RELEASE_VOCAB_SIZE = 157184
RELEASE_MASK_TOKEN_ID = 156895
# Hugging Face's default shard size ("5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# config.json keys the release's code reads but that change nothing at inference, or are bookkeeping. The
# release's MoE block never reads routed_scaling_factor or the router group fields.
_INERT_KEYS = frozenset({
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "use_cache", "output_router_logits", "bos_token_id", "attention_dropout", "routed_scaling_factor",
    "router_num_group", "router_topk_group", "rope_scaling",
})
# Written so that the release's config class does not fall back to its placeholder defaults.
_WRITTEN_DEFAULTS: dict[str, Any] = {"rope_scaling": None, "attention_dropout": 0.0, "use_cache": False,
                                     "output_router_logits": False}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release's state dict for ``config``, in file order, with its shape (reference §3)."""
    d, hd = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}

    def mlp(prefix: str, inter: int) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (inter, d)
        shapes[f"{prefix}.up_proj.weight"] = (inter, d)
        shapes[f"{prefix}.down_proj.weight"] = (d, inter)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (config.num_attention_heads * hd, d)
        shapes[f"{p}.self_attn.k_proj.weight"] = (config.num_key_value_heads * hd, d)
        shapes[f"{p}.self_attn.v_proj.weight"] = (config.num_key_value_heads * hd, d)
        shapes[f"{p}.self_attn.o_proj.weight"] = (d, config.num_attention_heads * hd)
        if config.qk_layernorm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (hd,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        if config.is_moe_layer(i):
            shapes[f"{p}.mlp.gate.weight"] = (config.num_experts, d)
            for j in range(config.num_experts):
                mlp(f"{p}.mlp.experts.{j}", config.expert_intermediate_size)
            if config.shared_expert_intermediate_size:
                mlp(f"{p}.shared_expert", config.shared_expert_intermediate_size)
        else:
            mlp(f"{p}.mlp", config.dense_intermediate_size)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def to_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """dlmoe state dict → the release's keys: fused experts split under their global indices, the (zero)
    selection bias dropped. Tensors are views of the inputs."""
    inter = config.expert_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            for j in range(tensor.shape[0]):
                out[f"{prefix}{j}.gate_proj.weight"] = tensor[j, :inter]
                out[f"{prefix}{j}.up_proj.weight"] = tensor[j, inter:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for j in range(tensor.shape[0]):
                out[f"{prefix}{j}.down_proj.weight"] = tensor[j]
        elif key.endswith("mlp.gate.selection_bias_E"):
            if torch.count_nonzero(tensor).item():
                raise ExportError(f"{key} is non-zero: aux-loss-free balancing biased expert selection, which the "
                                  f"release's format cannot express (its expert bias also changes the weights); "
                                  f"export a model trained with objective.balance.mode=aux_loss or none")
        else:
            out[key] = tensor
    _check_tensors(out, config, where="the model's state dict")
    return out


def from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig,
            where: str = "state dict") -> dict[str, torch.Tensor]:
    """The release's keys → a dlmoe state dict (experts stacked, a zero selection bias added).

    Missing, extra or misshapen tensors raise ``ExportError`` naming them and ``where`` they came from.
    """
    hf_state = dict(hf_state)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in hf_state:
        # The release ties lm_head to the embeddings when asked; a stored lm_head is ignored as it does.
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    _check_tensors(hf_state, config, where=where)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if ".mlp.experts." not in key:
            out[key] = tensor
    for i in range(config.num_hidden_layers):
        if not config.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp"
        experts = range(config.num_experts)
        out[f"{p}.experts.gate_up_proj"] = torch.stack([
            torch.cat([hf_state[f"{p}.experts.{j}.gate_proj.weight"], hf_state[f"{p}.experts.{j}.up_proj.weight"]])
            for j in experts])
        out[f"{p}.experts.down_proj"] = torch.stack([hf_state[f"{p}.experts.{j}.down_proj.weight"] for j in experts])
        out[f"{p}.gate.selection_bias_E"] = torch.zeros(config.num_experts, dtype=torch.float32)
    return out


def _check_tensors(state: dict[str, torch.Tensor], config: ModelConfig, where: str) -> None:
    expected = hf_tensor_shapes(config)
    missing = [k for k in expected if k not in state]
    extra = sorted(k for k in state if k not in expected)
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} {label}: {shown}")
    if problems:
        raise ExportError(f"tensors of {where} do not match the configuration: {'; '.join(problems)}")


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for ``config``: the release's fields, architecture, auto_map and dtype (no dlmoe-only facts)."""
    if config.norm_topk_prob:
        raise ExportError("norm_topk_prob=true cannot be exported: the release's modeling code never renormalises "
                          "the top-k router weights, so it would compute different logits")
    dtype_name = next((name for name, value in _DTYPES.items() if value == dtype), None)
    if dtype_name is None:
        raise ExportError(f"cannot export weights of dtype {dtype}; use one of {', '.join(_DTYPES)}")
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
            **config.to_json_dict(), **_WRITTEN_DEFAULTS, "torch_dtype": dtype_name}


def config_from_hf(data: dict[str, Any], source: str, mask_token_id: int | None) -> ModelConfig:
    """A ``ModelConfig`` from config.json; fields dlmoe cannot honour raise ``ConfigError`` naming them."""
    if data.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"model_type is {data.get('model_type')!r}, expected '{MODEL_TYPE}' (LLaDA-MoE)",
                          key="model_type", source=source)
    if data.get("rope_scaling") is not None:
        raise ConfigError(f"rope_scaling {data['rope_scaling']} is not supported (plain RoPE only)",
                          key="rope_scaling", source=source)
    defaults = ModelConfig()
    fields = {name for name in defaults.__dataclass_fields__ if name not in DLMOE_ONLY_FIELDS}
    values: dict[str, Any] = {}
    for name in sorted(fields):
        if name not in data:
            if name in ("initializer_range", "router_aux_loss_coef", "clip_qkv", "attention_bias",
                        "moe_router_enable_expert_bias", "tie_word_embeddings", "hidden_act", "rms_norm_eps"):
                continue
            raise ConfigError("is missing", key=name, source=source)
        value = data[name]
        if name == "num_key_value_heads" and value is None:
            value = data.get("num_attention_heads")
        expected = type(getattr(defaults, name))
        if name in ("shared_expert_intermediate_size", "clip_qkv"):
            ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
        elif expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif expected is list:
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        else:
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"has the wrong type: {value!r}", key=name, source=source)
        values[name] = value
    if data.get("norm_topk_prob"):
        raise ConfigError("norm_topk_prob=true cannot be honoured: the release's modeling code never renormalises "
                          "the top-k router weights", key="norm_topk_prob", source=source)
    unknown = sorted(k for k in data if k not in fields and k not in _INERT_KEYS)
    if unknown:
        warnings.warn(f"{source}: ignoring config.json fields dlmoe does not know: {', '.join(unknown)}",
                      stacklevel=3)
    if mask_token_id is None:
        if values.get("vocab_size") != RELEASE_VOCAB_SIZE:
            raise ConfigError(f"the mask token id is unknown: no {DLMOE_FILE} next to it and the vocabulary is not "
                              f"the release's; pass mask_token_id", key="mask_token_id", source=source)
        mask_token_id = RELEASE_MASK_TOKEN_ID
    config = ModelConfig(**values, mask_token_id=mask_token_id)
    config.validate(source=source, prefix="")
    return config


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return data


def read_dlmoe_facts(model_dir: str | Path) -> dict[str, Any]:
    """dlmoe.json of a folder (empty for a release folder that has none)."""
    path = Path(model_dir) / DLMOE_FILE
    return read_json(path) if path.exists() else {}


def load_config(model_dir: str | Path, mask_token_id: int | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a release-format folder (mask id from dlmoe.json unless given)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist")
    if not (folder / CONFIG_FILE).exists():
        from dlmoe.checkpointing import FOLDER_PREFIX, STATE_FILE

        if (folder / STATE_FILE).exists() or any(folder.glob(f"{FOLDER_PREFIX}*/{STATE_FILE}")):
            raise ExportError(f"{folder} is a training checkpoint or run folder, not a model folder: export it "
                              f"first (dlmoe export {folder} --out MODEL_DIR)")
    facts = read_dlmoe_facts(folder)
    if mask_token_id is None and facts.get("mask_token_id") is not None:
        mask_token_id = int(facts["mask_token_id"])
    return config_from_hf(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE), mask_token_id)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / INDEX_FILE).exists():
        index = read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{folder / INDEX_FILE} has no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise ExportError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        path = folder / filename
        if not path.is_file():
            raise ExportError(f"{path} is listed in {INDEX_FILE} but does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = handle.keys()
                for key in stored:
                    if weight_map is not None and weight_map.get(key) != filename:
                        raise ExportError(f"tensor {key} is in {path} but {INDEX_FILE} places it in "
                                          f"{weight_map.get(key)}")
                    tensors[key] = handle.get_tensor(key)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"cannot read {path}: {exc}") from exc
    if weight_map is not None:
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise ExportError(f"{INDEX_FILE} in {folder} lists tensors no shard holds: {', '.join(absent[:5])}")
    return tensors


def load_pretrained(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    mask_token_id: int | None = None) -> DiffusionMoE:
    """Load a release-format folder into a ``DiffusionMoE`` (weights keep their stored dtype unless ``dtype``)."""
    folder = Path(model_dir)
    config = load_config(folder, mask_token_id)
    return model_from_state(config, read_state(folder, config), device=device, dtype=dtype,
                            source=str(folder / CONFIG_FILE))


def read_state(model_dir: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of a release-format folder as a dlmoe state dict for ``config`` (tensors checked against it)."""
    folder = Path(model_dir)
    return from_hf(_read_tensors(folder), config, where=str(folder))


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], *, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, source: str | None = None) -> DiffusionMoE:
    """A ``DiffusionMoE`` (eval mode) holding a full dlmoe-format state dict, without a random initialisation."""
    model = build_model(config, device="meta", source=source)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype or state["model.embed_tokens.weight"].dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()
