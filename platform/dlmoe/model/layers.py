"""Attention and dense building blocks of the LLaDA-MoE decoder (reference/lladamoe.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlmoe.model.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by ``weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_cos_sin(seq_len: int, rot_dim: int, theta: float, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, rot_dim] of rotate-half RoPE; angles in float32, then cast to ``dtype``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x_BHLd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rot_dim`` dims of each head (``partial_rotary_factor``); pass the rest through."""
    rot_dim = cos.shape[-1]
    rot, passthrough = x_BHLd[..., :rot_dim], x_BHLd[..., rot_dim:]
    rotated = rot * cos + _rotate_half(rot) * sin
    return torch.cat([rotated, passthrough], dim=-1) if passthrough.shape[-1] else rotated


class Attention(nn.Module):
    """Bidirectional multi-head attention with optional grouped-query heads and per-head QK RMSNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.clip_qkv = config.clip_qkv
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_layernorm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, seq, _ = x.shape
        q = self.q_proj(x).view(b, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # The release clamps after the QK norm.
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        projected: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(b, seq, self.num_heads * self.head_dim))
        return projected


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: the dense MLP and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out
