"""``ModelConfig`` and the named flavors.

Field names are the ``config.json`` names of the official LLaDA-MoE release (reference/lladamoe.md §1) so that
export is a copy and users recognise them. The only field that is not a config.json field is ``mask_token_id``:
the release keeps it out of config.json, and our exporter writes it to ``dlmoe.json`` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dlmoe.errors import ConfigError

# The built-in byte-level vocabulary of the small flavors: ids 0..255 are bytes, then the specials.
# The embedding is padded to a multiple of 8 rows.
BYTE_EOS_ID = 256
BYTE_PAD_ID = 257
BYTE_MASK_ID = 258
BYTE_VOCAB_SIZE = 264

# Fields that exist only in dlmoe and are not written to config.json.
DLMOE_ONLY_FIELDS = frozenset({"mask_token_id"})


@dataclass
class ModelConfig:
    """The geometry and semantics of a LLaDA-MoE model (config.json names)."""

    vocab_size: int = BYTE_VOCAB_SIZE
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_intermediate_size: int = 32
    shared_expert_intermediate_size: int | None = None
    dense_intermediate_size: int = 256
    moe_layer_freq: list[int] = field(default_factory=lambda: [1, 1])
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    qk_layernorm: bool = True
    norm_topk_prob: bool = False
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    clip_qkv: float | None = None
    router_aux_loss_coef: float = 0.01
    initializer_range: float = 0.02
    eos_token_id: int = BYTE_EOS_ID
    pad_token_id: int = BYTE_PAD_ID
    mask_token_id: int = BYTE_MASK_ID

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return bool(self.moe_layer_freq[index])

    def validate(self, source: str | None = None, prefix: str = "model") -> None:
        """Raise ``ConfigError`` naming the key (under ``prefix``) when the geometry is inconsistent or unsupported."""

        def fail(key: str, message: str) -> None:
            raise ConfigError(message, key=f"{prefix}.{key}" if prefix else key, source=source)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_experts", "num_experts_per_tok", "expert_intermediate_size",
                     "dense_intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            fail("num_attention_heads", f"hidden_size {self.hidden_size} is not divisible by "
                                        f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail("num_key_value_heads", f"num_attention_heads {self.num_attention_heads} is not divisible by "
                                        f"num_key_value_heads {self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"top-k {self.num_experts_per_tok} exceeds num_experts {self.num_experts}")
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            fail("moe_layer_freq", f"has {len(self.moe_layer_freq)} entries for {self.num_hidden_layers} layers")
        if any(v not in (0, 1) for v in self.moe_layer_freq):
            fail("moe_layer_freq", f"entries must be 0 (dense) or 1 (MoE), got {self.moe_layer_freq}")
        if self.shared_expert_intermediate_size is not None and self.shared_expert_intermediate_size <= 0:
            fail("shared_expert_intermediate_size", "must be positive or null")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2 != 0 or self.rotary_dim == 0:
            fail("partial_rotary_factor", f"gives an odd or empty rotary dimension {self.rotary_dim} "
                                          f"for head_dim {self.head_dim}")
        if self.head_dim % 2 != 0 and self.rotary_dim == self.head_dim:
            fail("num_attention_heads", f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            fail("hidden_act", f"only 'silu' is supported, got '{self.hidden_act}'")
        if self.moe_router_score_function != "softmax":
            fail("moe_router_score_function", f"only 'softmax' is supported, got '{self.moe_router_score_function}'")
        if self.moe_router_enable_expert_bias:
            fail("moe_router_enable_expert_bias", "the release's weighted expert bias is not supported; "
                                                  "use objective.balance.mode=aux_free for selection-only balancing")
        if self.attention_bias:
            fail("attention_bias", "LLaDA-MoE has no biases; attention_bias=true is not supported")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            fail("clip_qkv", f"must be positive or null, got {self.clip_qkv}")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        for name in ("eos_token_id", "pad_token_id", "mask_token_id"):
            token = getattr(self, name)
            if not 0 <= token < self.vocab_size:
                fail(name, f"id {token} is outside the vocabulary [0, {self.vocab_size})")

    def to_json_dict(self) -> dict[str, object]:
        """The config.json fields (dlmoe-only fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in DLMOE_ONLY_FIELDS}


_FLAVORS: dict[str, ModelConfig] = {
    # Runs a training step in well under a second on a CPU; exercises grouped-query heads.
    "debug": ModelConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, expert_intermediate_size=32, dense_intermediate_size=128,
        moe_layer_freq=[1, 1], max_position_embeddings=512,
    ),
    # Small but shaped like the release: 64 experts top-8 (the MoE benchmark geometry).
    "tiny": ModelConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        num_experts=64, num_experts_per_tok=8, expert_intermediate_size=128, dense_intermediate_size=1024,
        moe_layer_freq=[1, 1, 1, 1], max_position_embeddings=2048,
    ),
    # The release's ratios at a size a CPU trains in minutes (bench/quality.py): 64 experts top-8 of width
    # hidden / 2, head_dim 32, every layer MoE ...
    "mini-moe": ModelConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        num_experts=64, num_experts_per_tok=8, expert_intermediate_size=64, dense_intermediate_size=512,
        moe_layer_freq=[1, 1, 1, 1], max_position_embeddings=512,
    ),
    # ... and its dense twin: every layer one SwiGLU MLP as wide as the 8 experts a token reaches (the same
    # active parameters, but for the router).
    "mini-dense": ModelConfig(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        num_experts=64, num_experts_per_tok=8, expert_intermediate_size=64, dense_intermediate_size=512,
        moe_layer_freq=[0, 0, 0, 0], max_position_embeddings=512,
    ),
    # The exact geometry of inclusionAI/LLaDA-MoE-7B-A1B (reference/lladamoe.md §1).
    "llada-moe-7b-a1b": ModelConfig(
        vocab_size=157184, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, expert_intermediate_size=1024,
        shared_expert_intermediate_size=None, dense_intermediate_size=8192, moe_layer_freq=[1] * 16,
        max_position_embeddings=8192, rope_theta=50000.0, partial_rotary_factor=1.0, rms_norm_eps=1e-5,
        qk_layernorm=True, norm_topk_prob=False, tie_word_embeddings=False, router_aux_loss_coef=0.01,
        eos_token_id=156892, pad_token_id=156892, mask_token_id=156895,
    ),
}


def flavor_names() -> list[str]:
    return sorted(_FLAVORS)


def get_flavor(name: str) -> ModelConfig:
    """A fresh copy of the named flavor's ``ModelConfig``."""
    if name not in _FLAVORS:
        raise ConfigError(f"unknown flavor '{name}'; known flavors: {', '.join(flavor_names())}",
                          key="model.flavor")
    return dataclasses.replace(_FLAVORS[name], moe_layer_freq=list(_FLAVORS[name].moe_layer_freq))
