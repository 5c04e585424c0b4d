"""A DeepSpeed engine for a ``DiffusionMoE``, with expert parallelism through DeepSpeed AutoEP.

With ``parallel.ep_size > 1`` the DeepSpeed config carries an ``expert_parallel`` section describing our MoE
block (``model.layers.{i}.mlp`` with router ``gate`` and fused 3-D experts ``gate_up_proj`` [E, 2I, D], gate rows
first, and ``down_proj`` [E, D, I]) and LLaDA-MoE's routing (softmax over all experts, top-k, no renormalisation,
weights applied after the experts). ``deepspeed.initialize`` then replaces each block with an ``AutoEPMoELayer``
that holds ``E / ep_size`` experts, moves tokens by all-to-all without dropping any, and has DeepSpeed reduce the
expert gradients over the expert-data-parallel group and partition them under ZeRO. We use AutoEP rather than
``deepspeed.moe.layer.MoE`` because the latter always renormalises the top-k weights and drops tokens by capacity
(reference/platform-notes.md), which LLaDA-MoE does not.

AutoEP's layer returns only the hidden states, so each one is wrapped in ``ExpertParallelMoE``, which gives the
decoder layer what our own block gives it: the output and ``RouterStats`` (router logits, probabilities and the
global-expert token counts) for the load-balance and z-losses. The wrapper recomputes the router logits from the
same gate weight — a D × E product, small next to the experts — so the balance losses' gradient reaches the router
exactly as in our block. With ``ep_size == 1`` no layer is replaced and our own grouped-GEMM block runs under
DeepSpeed unchanged.

The optimizer is built by DeepSpeed's call of our factory *after* AutoEP has replaced the blocks (a client
optimizer made before would hold the replaced parameters), with the expert parameters in their own MoE groups as
ZeRO requires. The learning rate follows ``dlmoe.parallel.schedule.lr_at`` step by step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlmoe.config import JobConfig
from dlmoe.errors import ConfigError
from dlmoe.model import DiffusionMoE, ModelConfig
from dlmoe.model.moe import RouterStats, router_stats, select_experts
from dlmoe.parallel.schedule import lr_at


def autoep_section(config: ModelConfig, ep_size: int) -> dict[str, Any]:
    """DeepSpeed's ``expert_parallel`` section for our MoE block layout and LLaDA-MoE routing."""
    return {
        "enabled": True, "autoep_size": ep_size, "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
        "router_pattern": "gate", "expert_pattern": "experts", "expert_w1": "gate_up_proj",
        "expert_w2": "down_proj", "expert_w3": None, "num_experts_attr": "num_experts",
        "top_k": config.num_experts_per_tok, "score_func": "softmax", "route_norm": config.norm_topk_prob,
        "score_apply": "post", "has_shared_experts": False,
    }


def deepspeed_config(job: JobConfig, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of ``job`` (batch geometry, ZeRO, precision, clipping, expert parallelism)."""
    config: dict[str, Any] = {
        "train_batch_size": job.data.global_batch_size,
        "train_micro_batch_size_per_gpu": job.micro_batch_per_worker,
        "gradient_accumulation_steps": job.accumulation_steps,
        "gradient_clipping": job.train.grad_clip,
        "zero_optimization": {"stage": job.parallel.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if job.train.precision == "bf16":
        if not use_gpu:
            raise ConfigError("bf16 training needs GPUs; use train.precision=fp32 on CPU", key="train.precision")
        config["bf16"] = {"enabled": True}
    if job.parallel.ep_size > 1:
        if job.objective.balance.mode == "aux_free":
            raise ConfigError("aux-loss-free balancing is not available with expert parallelism (AutoEP routes "
                              "without our selection bias); use objective.balance.mode=aux_loss",
                              key="objective.balance.mode")
        config["expert_parallel"] = autoep_section(job.model.to_model_config(), job.parallel.ep_size)
    return config


class ExpertParallelMoE(nn.Module):
    """An ``AutoEPMoELayer`` with our block's interface: ``(x, valid_T) -> (output, RouterStats)``."""

    def __init__(self, layer: nn.Module, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x: torch.Tensor, valid_T: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        out = self.layer(x)
        if isinstance(out, tuple):
            out = out[0]
        x_TD = x.reshape(-1, x.shape[-1])
        router: Any = self.layer.router
        logits_TE = F.linear(x_TD, router.gate.weight)
        if valid_T is not None:
            logits_TE = logits_TE[valid_T]
        scores_TE, experts_TK = select_experts(logits_TE, self.top_k)
        return out.reshape(x.shape), router_stats(logits_TE, scores_TE, experts_TK, self.num_experts)


def _optimizer_factory(job: JobConfig) -> Any:
    t = job.train

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer({"params": list(params), "name": "params"})
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)

    return build


def _scheduler_factory(job: JobConfig) -> Any:
    t = job.train

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(
            step, base_lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
            min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction) / t.lr)

    return build


def parallelize(model: DiffusionMoE, job: JobConfig, use_gpu: bool = False) -> Any:
    """Wrap ``model`` in a DeepSpeed engine for ``job`` (torch.distributed must already be initialised with
    ``parallel.num_workers`` ranks)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != job.parallel.num_workers:
        raise ConfigError(f"{world} processes run a job configured for parallel.num_workers "
                          f"{job.parallel.num_workers}", key="parallel.num_workers")

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=_optimizer_factory(job), lr_scheduler=_scheduler_factory(job),
        config=deepspeed_config(job, use_gpu), dist_init_required=False)
    if world == 1 and job.parallel.zero_stage == 0:
        # One rank has no gradients to average, yet DeepSpeed would still copy each into a flat buffer and back.
        # (From ZeRO-1 on, that reduction also hands the gradients to the optimizer's partitions: it stays.)
        engine.enable_backward_allreduce = False
    config = model.config
    for layer in model.model.layers:
        if isinstance(layer.mlp, AutoEPMoELayer):
            layer.mlp = ExpertParallelMoE(layer.mlp, config.num_experts, config.num_experts_per_tok)
    return engine


def full_state_dict(model: DiffusionMoE) -> dict[str, torch.Tensor]:
    """The whole model in dlmoe's own layout and global expert order, on every rank (a collective under EP).

    An expert-parallel layer holds ``E / ep_size`` experts as AutoEP's ``w1`` (gate) [E_l, I, D], ``w3`` (up)
    [E_l, I, D] and ``w2`` (down) [E_l, D, I]; they are all-gathered over the layer's EP group in rank order (rank
    r holds experts r·E_l … (r+1)·E_l − 1) and fused back into ``gate_up_proj`` / ``down_proj``. Under ZeRO 0–2
    every other parameter is whole on every rank.
    """
    import torch.distributed as dist

    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".mlp.layer." not in name:
            state[name] = tensor.detach()
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, ExpertParallelMoE):
            continue
        inner: Any = layer.mlp.layer
        group, size = inner.ep_group, inner.ep_size

        def gather(local: torch.Tensor, group: Any = group, size: int = size) -> torch.Tensor:
            parts = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(parts, local.detach().contiguous(), group=group)
            return torch.cat(parts)

        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = inner.router.gate.weight.detach()
        state[prefix + "experts.gate_up_proj"] = torch.cat([gather(inner.experts.w1), gather(inner.experts.w3)], 1)
        state[prefix + "experts.down_proj"] = gather(inner.experts.w2)
        state[prefix + "gate.selection_bias_E"] = torch.zeros(layer.mlp.num_experts, dtype=torch.float32)
    return state


def params_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor of a full state dict, in key order (names, shapes, dtypes and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
