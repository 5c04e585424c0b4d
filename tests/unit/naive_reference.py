"""A deliberately plain re-statement of reference/lladamoe.md §2, written independently of dlmoe.model:
explicit loops over experts (in the style of the official modeling code), explicit repeat of k/v heads, and
attention as a written-out softmax. It reads weights by the release's state-dict keys (reference §3), so comparing
the fast model against it checks the model and the export key mapping together."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dlmoe.model import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def naive_moe(x_TD: torch.Tensor, gate_w: torch.Tensor, experts: list[Expert], top_k: int,
              norm_topk: bool = False) -> torch.Tensor:
    """Per-expert loop over (gate_proj, up_proj, down_proj) weights: softmax in float32, top-k, optional
    renormalisation, weighted sum of SwiGLU experts."""
    probs = torch.softmax((x_TD @ gate_w.t()).float(), dim=-1)
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights.to(x_TD.dtype)
    out = torch.zeros_like(x_TD)
    for e, (w_gate, w_up, w_down) in enumerate(experts):
        token_idx, slot = torch.where(chosen == e)
        if token_idx.numel() == 0:
            continue
        xe = x_TD[token_idx]
        ye = (F.silu(xe @ w_gate.t()) * (xe @ w_up.t())) @ w_down.t()
        out = out.index_add(0, token_idx, ye * weights[token_idx, slot, None])
    return out


def split_experts(gate_up_EHD: torch.Tensor, down_EDI: torch.Tensor) -> list[Expert]:
    """Per-expert views of fused expert tensors (gradients flow back to the fused ones)."""
    inter = down_EDI.shape[-1]
    return [(gate_up_EHD[e, :inter], gate_up_EHD[e, inter:], down_EDI[e]) for e in range(gate_up_EHD.shape[0])]


def _rope(x: torch.Tensor, theta: float, rot_dim: int) -> torch.Tensor:
    seq = x.shape[2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    xr, xp = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


def naive_forward(cfg: ModelConfig, sd: dict[str, torch.Tensor], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from a state dict in the release's format (reference §3 keys, one module per expert)."""
    b, seq = input_ids.shape
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    x = sd["model.embed_tokens.weight"][input_ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h_in = rms_norm(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h_in @ sd[p + "self_attn.q_proj.weight"].t()).view(b, seq, heads, hd)
        k = (h_in @ sd[p + "self_attn.k_proj.weight"].t()).view(b, seq, kv, hd)
        v = (h_in @ sd[p + "self_attn.v_proj.weight"].t()).view(b, seq, kv, hd)
        if cfg.qk_layernorm:
            q = rms_norm(q, sd[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, sd[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rot = int(hd * cfg.partial_rotary_factor)
        q, k = _rope(q, cfg.rope_theta, rot), _rope(k, cfg.rope_theta, rot)
        k = k.repeat_interleave(heads // kv, dim=1)
        v = v.repeat_interleave(heads // kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        x = x + attn.transpose(1, 2).reshape(b, seq, heads * hd) @ sd[p + "self_attn.o_proj.weight"].t()
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if cfg.moe_layer_freq[i]:
            flat = h.reshape(-1, cfg.hidden_size)
            e = p + "mlp.experts."
            experts = [(sd[f"{e}{j}.gate_proj.weight"], sd[f"{e}{j}.up_proj.weight"], sd[f"{e}{j}.down_proj.weight"])
                       for j in range(cfg.num_experts)]
            y = naive_moe(flat, sd[p + "mlp.gate.weight"], experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
            y = y.view_as(h)
            if cfg.shared_expert_intermediate_size:
                s = p + "shared_expert."
                y = y + (F.silu(h @ sd[s + "gate_proj.weight"].t()) * (h @ sd[s + "up_proj.weight"].t())) \
                    @ sd[s + "down_proj.weight"].t()
        else:
            d = p + "mlp."
            y = (F.silu(h @ sd[d + "gate_proj.weight"].t()) * (h @ sd[d + "up_proj.weight"].t())) \
                @ sd[d + "down_proj.weight"].t()
        x = x + y
    x = rms_norm(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    return x @ sd["lm_head.weight"].t()
