"""The LLaDA-MoE bidirectional transformer (``DiffusionMoE``) and ``build_model``.

Module names mirror the release's state-dict keys (``model.embed_tokens``, ``model.layers.{i}.self_attn``,
``model.layers.{i}.mlp.gate``, ``model.norm``, ``lm_head``); only the experts differ, stored fused (see moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dlmoe.errors import ModelInputError
from dlmoe.model.config import ModelConfig
from dlmoe.model.layers import Attention, RMSNorm, SwiGLU, rotary_cos_sin
from dlmoe.model.moe import GroupedExperts, MoEBlock, Router, RouterStats


@dataclass
class ModelOutput:
    """``logits`` [B, L, V] and one ``RouterStats`` per MoE layer, in layer order."""

    logits: torch.Tensor
    router_stats: list[RouterStats] = field(default_factory=list)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``y = h + mlp(norm(h)) [+ shared_expert(norm(h))]``."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(index)
        self.mlp: nn.Module
        self.mlp = MoEBlock(config) if self.is_moe else SwiGLU(config.hidden_size, config.dense_intermediate_size)
        self.shared_expert: SwiGLU | None = None
        if self.is_moe and config.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None,
                valid_T: torch.Tensor | None) -> tuple[torch.Tensor, RouterStats | None]:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        normed = self.post_attention_layernorm(h)
        stats = None
        if self.is_moe:
            # Our MoEBlock, or whatever the parallelize step put in its place, returns (output, RouterStats).
            mlp_out, stats = self.mlp(normed, valid_T)
        else:
            mlp_out = self.mlp(normed)
        if self.shared_expert is not None:
            mlp_out = mlp_out + self.shared_expert(normed)
        return h + mlp_out, stats


class Backbone(nn.Module):
    """Embeddings, decoder layers and the final norm (the release's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DiffusionMoE(nn.Module):
    """A LLaDA-MoE mask predictor: bidirectional, no timestep input, logits for every position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Activation checkpointing: in training, keep only each decoder layer's input and recompute the layer
        # during backward (``train.activation_checkpointing``).
        self.activation_checkpointing = False
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for the norms, zero selection bias."""
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
                elif isinstance(module, nn.Linear | nn.Embedding):
                    module.weight.normal_(0.0, std, generator=generator)
                elif isinstance(module, Router):
                    module.weight.normal_(0.0, std, generator=generator)
                    module.selection_bias_E.zero_()
                elif isinstance(module, GroupedExperts):
                    module.gate_up_proj.normal_(0.0, std, generator=generator)
                    module.down_proj.normal_(0.0, std, generator=generator)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ModelInputError(f"input_ids must be an integer tensor [batch, seq_len], "
                                  f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ModelInputError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                                  f"{cfg.max_position_embeddings}")
        if input_ids.numel() and input_ids.device.type != "meta":
            low, high = torch.aminmax(input_ids)
            if low.item() < 0 or high.item() >= cfg.vocab_size:
                raise ModelInputError(f"token ids must lie in [0, {cfg.vocab_size}) (vocab_size), "
                                      f"got min {low.item()} max {high.item()}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ModelInputError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                                  f"shape {tuple(input_ids.shape)}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                attention_pattern: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ModelOutput:
        """``input_ids`` [B, L]; ``attention_mask`` [B, L] (1 = token, 0 = padding) hides padding keys only.

        Training objectives that restrict attention further (document-level attention, block diffusion) pass
        ``attention_pattern``, a boolean [B or 1, 1, L, L] (True: the query may attend the key), and may give each
        token its RoPE position in ``position_ids`` [B or 1, L] (default: 0..L-1).
        """
        self._check_inputs(input_ids, attention_mask)
        seq = input_ids.shape[1]
        if attention_pattern is not None and attention_pattern.shape[-2:] != (seq, seq):
            raise ModelInputError(f"attention_pattern shape {tuple(attention_pattern.shape)} does not end in "
                                  f"({seq}, {seq})")
        x = self.model.embed_tokens(input_ids)
        table = seq if position_ids is None else int(position_ids.max()) + 1
        cos, sin = rotary_cos_sin(table, self.config.rotary_dim, self.config.rope_theta, x.device, x.dtype)
        if position_ids is not None:  # [B or 1, 1, L, rot_dim]: broadcast over the heads
            cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
        attn_mask = valid_T = None
        if attention_mask is not None:
            keep = attention_mask.bool()
            attn_mask = keep[:, None, None, :]
            valid_T = keep.reshape(-1)
        if attention_pattern is not None:
            attn_mask = attention_pattern if attn_mask is None else attention_pattern & attn_mask
        stats: list[RouterStats] = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                x, layer_stats = checkpoint(layer, x, cos, sin, attn_mask, valid_T, use_reentrant=False)
            else:
                x, layer_stats = layer(x, cos, sin, attn_mask, valid_T)
            if layer_stats is not None:
                stats.append(layer_stats)
        logits = self.lm_head(self.model.norm(x))
        return ModelOutput(logits=logits, router_stats=stats)


def build_model(config: ModelConfig, device: str | torch.device | None = None, seed: int | None = None,
                source: str | None = None) -> DiffusionMoE:
    """Validate ``config`` and build the model on ``device`` (``"meta"`` allocates nothing).

    Weights are initialised from ``seed`` (a fixed default when None) unless the device is meta.
    """
    config.validate(source=source)
    with torch.device(device or "cpu"):
        model = DiffusionMoE(config)
    if model.lm_head.weight.device.type != "meta":
        generator = torch.Generator(device=model.lm_head.weight.device)
        generator.manual_seed(0 if seed is None else seed)
        model.init_weights(generator)
    return model


def count_parameters(model: DiffusionMoE) -> dict[str, int]:
    """Total and per-token active parameter counts.

    ``active_params`` counts what one token's forward pass multiplies with: everything except the input
    embedding table (a lookup) and the experts it is not routed to (the usual "A1B" convention: the release's
    1.4B). ``active_params_with_embeddings`` adds the embedding table back.
    """
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel() if not cfg.tie_word_embeddings else 0
    idle_experts = 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoEBlock):
            per_expert = sum(p.numel() for p in layer.mlp.experts.parameters()) // cfg.num_experts
            idle_experts += per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
    return {
        "total_params": total,
        "active_params": total - embedding - idle_experts,
        "active_params_with_embeddings": total - idle_experts,
    }
