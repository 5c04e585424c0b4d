"""One MoE layer, forward + backward on CPU in fp32: dlmoe's ``MoEBlock`` against three other implementations.

Geometry (fixed): E=64 experts, top-k=8, hidden 256, expert intermediate width 128; ``--tokens`` tokens (4096).

Rows:
  ours       ``dlmoe.model.moe.MoEBlock`` (sort by expert + two grouped GEMMs forward, four backward).
  naive      a per-expert loop in the style of the Hugging Face modeling code (float32 softmax router, top-k,
             no renormalisation; per expert: ``torch.where`` for its tokens, SwiGLU with per-expert ``nn.Linear``,
             times the routing weight, ``index_add_``). Loaded with ours' weights; its output and input gradient
             are asserted equal to ours (atol 1e-4) before it is timed.
  deepspeed  DeepSpeed's stock ``deepspeed.moe.layer.MoE`` (top-k gating, ``drop_tokens=False``, ep_size 1),
             loaded with the same weights. Its gating always renormalises the top-k weights, so its output is
             compared (for information only) with a renormalised per-expert reference, not with ours.
  autoep     DeepSpeed AutoEP's ``AutoEPMoELayer`` (autoep_size 1), obtained by running AutoEP's detection and
             replacement on a wrapper whose ``model.layers.0.mlp`` is our ``MoEBlock`` (fused 3-D experts:
             ``expert_w1=gate_up_proj``, ``expert_w2=down_proj``, ``expert_w3=None``). Compared with ours.
  gemms      not a layer: ours' six grouped GEMMs alone (two forward, four backward), on ours' routed counts and
             the same shapes, with operands prepared outside the clock — no router, sort, gather, SwiGLU or
             combine. The ceiling of any layer built on these GEMMs: its "% of mm peak" bounds ours'.

Each row runs in a fresh ``multiprocessing`` spawn subprocess. In it: build the layer (same seed, so the same
router/expert weights and inputs in every row), measure the fp32 matmul peak (median of 5 reps of a
2048x2048 @ 2048x2048 ``torch.mm``), check correctness, warm up 2 iterations, then time ``--iters`` iterations of
``out = layer(x); out.backward(grad)`` with a fixed random, contiguous upstream gradient (x requires grad; the
parameter and input gradients are reset to None before every iteration, outside the timed span).

Memory: the process's peak RSS during one extra iteration after the timed ones, minus its RSS right before it
(when only the parameters and inputs are live: gradients are reset to None first, so they count towards the
peak). Before that iteration, ``malloc_trim(0)`` hands the heap glibc kept from earlier iterations back to the
kernel (otherwise the iteration reuses resident free memory and the delta reads ~0), then the kernel's RSS
high-water mark is reset (``echo 5 > /proc/self/clear_refs``), so ``ru_maxrss`` afterwards is that iteration's peak;
where that reset is refused, ``ru_maxrss`` is the peak since the process started (the output says so).
The JSON also has ``peak_vs_setup_mb``: the same peak minus the (trimmed) RSS after building and checking the
layer, before the warm-up.

The machine may be shared: each row measures the matmul peak before setup and again after timing (the higher
is used for "% of mm peak") and how many cores other processes kept busy during its timed iterations (from
/proc/stat minus its own CPU time, steal included). With 2 OpenMP threads on 2 cores, even one busy core
elsewhere slows the many-small-op rows (per-expert loops) by large factors, so read such rows with care.

Work: 3 matmuls of 2*D*I flops per routed token slot forward, x3 for forward + backward:
18 * T * K * D * I = 19.3 GFLOP at the defaults (router matmul not counted; DeepSpeed's capacity padding does
extra, uncounted work).

Run (from the repository root):
    .venv/bin/python bench/moe_layer.py                      # defaults: --iters 5 --tokens 4096
    .venv/bin/python bench/moe_layer.py --iters 2 --tokens 1024 --impls ours,naive
    .venv/bin/python bench/moe_layer.py --json /tmp/moe_layer.json
    .venv/bin/python bench/moe_layer.py --alternate 9    # ours and gemms in turn, one process: the ratio
    git archive REV platform | tar -x -C /tmp/old      # then, against that revision's block:
    .venv/bin/python bench/moe_layer.py --alternate 9 --baseline /tmp/old
The glibc allocator settings matter for these large temporaries: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_
and MALLOC_TOP_PAD_ are printed (set them in the environment of this command; subprocesses inherit them).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from benchutil import (
    CpuContention,
    bench_parser,
    failed_row,
    malloc_trim,
    matmul_peak_gflops,
    maxrss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_isolated,
    table_head,
    write_json,
)
from torch import nn

if TYPE_CHECKING:  # imported lazily at run time (in the subprocesses)
    from dlmoe.model import MoEBlock

HIDDEN = 256
NUM_EXPERTS = 64
TOP_K = 8
INTERMEDIATE = 128
INIT_STD = 0.02
WARMUP = 2
SEED = 1234
CHECK_ATOL = 1e-4
IMPLS = ("ours", "naive", "deepspeed", "autoep", "gemms")
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
MEMORY_METHOD = (
    "peak RSS of one extra iteration after the timed ones minus RSS right before it, in a fresh spawn subprocess "
    "per row; glibc malloc_trim(0) first (so the baseline is live memory, not heap kept from earlier iterations), "
    "then the RSS high-water mark is reset via /proc/self/clear_refs, and read back afterwards as ru_maxrss"
)


def work_flops(tokens: int) -> float:
    """Useful flops of one forward + backward: 3 expert matmuls per routed slot, x3 for fwd+bwd."""
    return 3.0 * 3.0 * 2.0 * tokens * TOP_K * HIDDEN * INTERMEDIATE


# --------------------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------------------


class SwiGLUExpert(nn.Module):
    """One expert: ``down(silu(gate(x)) * up(x))`` with bias-free linears."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out

    def load_fused(self, gate_up_HD: torch.Tensor, down_DI: torch.Tensor) -> None:
        """Copy one expert's slice of the fused weights (gate rows first, then up rows)."""
        inter = down_DI.shape[-1]
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate_up_HD[:inter])
            self.up_proj.weight.copy_(gate_up_HD[inter:])
            self.down_proj.weight.copy_(down_DI)


class NaiveLoopMoE(nn.Module):
    """Per-expert loop MoE in the Hugging Face modeling-code style (softmax in fp32, top-k, optional renorm)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int,
                 renormalize: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, intermediate) for _ in range(num_experts))

    def load_from_block(self, block: MoEBlock) -> None:
        """Take router and expert weights from a dlmoe ``MoEBlock``."""
        with torch.no_grad():
            self.gate.weight.copy_(block.gate.weight)
            for e, expert in enumerate(self.experts):
                assert isinstance(expert, SwiGLUExpert)
                expert.load_fused(block.experts.gate_up_proj[e], block.experts.down_proj[e])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = self.gate(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK.to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        # [E, K, T] membership mask; only experts that received a token are visited.
        mask_EKT = F.one_hot(experts_TK, num_classes=self.num_experts).permute(2, 1, 0)
        hit_experts = torch.nonzero(mask_EKT.sum(dim=(1, 2)) > 0).flatten().tolist()
        for e in hit_experts:
            slot_k, token_idx = torch.where(mask_EKT[e])
            y = self.experts[e](x_TD[token_idx]) * weights_TK[token_idx, slot_k, None]
            out_TD.index_add_(0, token_idx, y.to(x_TD.dtype))
        return out_TD


class _Holder(nn.Module):
    """A bare module used to give our block the module path AutoEP looks for (``model.layers.0.mlp``)."""


class _SixGemms(torch.autograd.Function):
    """The ``gemms`` row: ours' two forward and four backward grouped GEMMs on prepared operands."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, operands: dict[str, torch.Tensor]) -> torch.Tensor:
        from dlmoe.model.moe import _grouped_mm

        o = operands
        ctx.operands = o
        _grouped_mm(o["x_ND"], o["gate_up"].transpose(-2, -1), o["offs"])
        _grouped_mm(o["act_NI"], o["down"].transpose(-2, -1), o["offs"])
        return x_TD.clone()  # an output of the input's shape for the harness (a 4 MB copy)

    @staticmethod
    def backward(ctx: Any, grad_TD: torch.Tensor) -> tuple[torch.Tensor, None]:
        from dlmoe.model.moe import _grouped_mm

        o = ctx.operands
        _grouped_mm(o["grad_ND"], o["down"], o["offs"])
        _grouped_mm(o["grad_ND"].t(), o["act_NI"], o["offs"])
        _grouped_mm(o["grad_h_NH"].t(), o["x_ND"], o["offs"])
        _grouped_mm(o["grad_h_NH"], o["gate_up"], o["offs"])
        return grad_TD, None


def _gemm_operands(block: MoEBlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ours' routing of ``x`` and seeded operands of the shapes its six grouped GEMMs see."""
    with torch.no_grad():
        _, _, _, experts_TK = block.gate(x)
        order_N = torch.argsort(experts_TK.reshape(-1), stable=True)
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=NUM_EXPERTS)
    gen = torch.Generator().manual_seed(SEED + 1)
    slots = order_N.numel()
    return {"x_ND": x[order_N // TOP_K].contiguous(), "offs": torch.cumsum(counts_E, 0, dtype=torch.int32),
            "act_NI": torch.randn(slots, INTERMEDIATE, generator=gen),
            "grad_ND": torch.randn(slots, HIDDEN, generator=gen),
            "grad_h_NH": torch.randn(slots, 2 * INTERMEDIATE, generator=gen),
            "gate_up": block.experts.gate_up_proj.detach(), "down": block.experts.down_proj.detach()}


def _wrap_for_autoep(block: nn.Module) -> nn.Module:
    layer = _Holder()
    layer.mlp = block
    backbone = _Holder()
    backbone.layers = nn.ModuleList([layer])
    root = _Holder()
    root.model = backbone
    return root


# --------------------------------------------------------------------------------------------------------------
# Child-process helpers
# --------------------------------------------------------------------------------------------------------------


def _init_distributed() -> None:
    import deepspeed

    from data_pipeline.local_s3 import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")


def _build_ours(tokens: int) -> tuple[MoEBlock, torch.Tensor, torch.Tensor]:
    """Our block with seeded normal(0, 0.02) weights, plus the seeded input and upstream gradient."""
    from dlmoe.model import MoEBlock, get_flavor

    cfg = dataclasses.replace(get_flavor("tiny"), hidden_size=HIDDEN, num_experts=NUM_EXPERTS,
                              num_experts_per_tok=TOP_K, expert_intermediate_size=INTERMEDIATE)
    gen = torch.Generator().manual_seed(SEED)
    block = MoEBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, INIT_STD, generator=gen)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    grad = torch.randn(tokens, HIDDEN, generator=gen).contiguous()
    return block, x, grad


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.detach().clone().requires_grad_(True)
    out = fn(xr)
    torch.autograd.backward(out, grad)  # what out.backward(grad) calls; typed, unlike Tensor.backward
    assert xr.grad is not None
    return out.detach(), xr.grad


def _max_diff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    return (a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item()


def _setup(impl: str, tokens: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Parameter],
                                             torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Build one implementation; return (forward fn [T, D] -> [T, D], params, x, grad, check info)."""
    block, x, grad = _build_ours(tokens)

    def ours_fn(t: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = block(t)[0]
        return out

    info: dict[str, Any] = {}
    if impl == "ours":
        return ours_fn, list(block.parameters()), x, grad, info

    if impl == "naive":
        naive = NaiveLoopMoE(HIDDEN, NUM_EXPERTS, TOP_K, INTERMEDIATE)
        naive.load_from_block(block)
        d_out, d_grad = _max_diff(_fwd_bwd(naive, x, grad), _fwd_bwd(ours_fn, x, grad))
        info.update(check="vs ours", max_abs_diff_out=d_out, max_abs_diff_grad_x=d_grad)
        if not (d_out <= CHECK_ATOL and d_grad <= CHECK_ATOL):
            raise AssertionError(f"naive loop differs from ours: out {d_out:.3g}, grad_x {d_grad:.3g}")
        return naive, list(naive.parameters()), x, grad, info

    if impl == "deepspeed":
        _init_distributed()
        from deepspeed.moe.layer import MoE

        moe = MoE(hidden_size=HIDDEN, expert=SwiGLUExpert(HIDDEN, INTERMEDIATE), num_experts=NUM_EXPERTS,
                  ep_size=1, k=TOP_K, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4,
                  drop_tokens=False, use_rts=False)
        moe.set_deepspeed_parallelism()
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(block.gate.weight)
            for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                expert.load_fused(block.experts.gate_up_proj[e], block.experts.down_proj[e])

        def ds_fn(t: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = moe(t)[0]
            return out

        renorm = NaiveLoopMoE(HIDDEN, NUM_EXPERTS, TOP_K, INTERMEDIATE, renormalize=True)
        renorm.load_from_block(block)
        ds_res = _fwd_bwd(ds_fn, x, grad)
        d_out, d_grad = _max_diff(ds_res, _fwd_bwd(renorm, x, grad))
        d_ours, _ = _max_diff(ds_res, _fwd_bwd(ours_fn, x, grad))
        info.update(check="vs renormalised per-expert reference (info only)", max_abs_diff_out=d_out,
                    max_abs_diff_grad_x=d_grad, max_abs_diff_out_vs_ours=d_ours)
        return ds_fn, list(moe.parameters()), x, grad, info

    if impl == "autoep":
        _init_distributed()
        from deepspeed.module_inject.auto_ep import AutoEP
        from deepspeed.module_inject.auto_ep_config import parse_autoep_config
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

        ref = _fwd_bwd(ours_fn, x, grad)
        wrapper = _wrap_for_autoep(block)
        from dlmoe.model import get_flavor
        from dlmoe.parallel import autoep_section

        section = autoep_section(dataclasses.replace(get_flavor("tiny"), num_experts_per_tok=TOP_K), 1)
        autoep = AutoEP(wrapper, parse_autoep_config(section))
        specs = autoep.ep_parser()
        if len(specs) != 1:
            raise RuntimeError(f"AutoEP detected {len(specs)} MoE layers, expected 1")
        autoep.replace_moe_layers(specs, ep_size=1, ep_rank=0)
        layer = wrapper.get_submodule("model.layers.0.mlp")
        if not isinstance(layer, AutoEPMoELayer):
            raise RuntimeError(f"AutoEP left {type(layer).__name__} at model.layers.0.mlp, not AutoEPMoELayer")
        layer.set_deepspeed_parallelism()
        info["layer"] = type(layer).__name__
        info["spec"] = {k: getattr(specs[0], k) for k in ("expert_storage", "expert_w1_name", "expert_w2_name",
                                                          "expert_w3_name", "score_func", "route_norm",
                                                          "score_apply", "top_k", "ffn_hidden_size")}

        def autoep_fn(t: torch.Tensor) -> torch.Tensor:
            out = layer(t.view(1, t.shape[0], t.shape[1]))
            if isinstance(out, tuple):
                out = out[0]
            result: torch.Tensor = out.view(t.shape)
            return result

        d_out, d_grad = _max_diff(_fwd_bwd(autoep_fn, x, grad), ref)
        info.update(check="vs ours", max_abs_diff_out=d_out, max_abs_diff_grad_x=d_grad,
                    matches=bool(d_out <= CHECK_ATOL and d_grad <= CHECK_ATOL))
        del block  # the replaced source module is no longer part of any live graph
        return autoep_fn, list(layer.parameters()), x, grad, info

    if impl == "gemms":
        operands = _gemm_operands(block, x)

        def gemms_fn(t: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = _SixGemms.apply(t, operands)  # type: ignore[no-untyped-call]
            return out

        info["check"] = "not a layer: its GEMMs only"
        return gemms_fn, [], x, grad, info

    raise ValueError(f"unknown implementation {impl!r}")


def run_impl(impl: str, tokens: int, iters: int) -> dict[str, Any]:
    """Child-process entry point: set up, check, warm up, time; never raises (errors go into the result)."""
    result: dict[str, Any] = {"impl": impl, "pid": os.getpid(), "threads": torch.get_num_threads()}
    try:
        if impl in ("deepspeed", "autoep"):
            import logging

            from deepspeed.utils import logger as ds_logger

            ds_logger.setLevel(logging.WARNING)
            result["deepspeed_accelerator"] = type(__import__("deepspeed").accelerator.get_accelerator()).__name__
        mm_before = matmul_peak_gflops()
        fn, params, x, grad, info = _setup(impl, tokens)
        result.update(info)
        result["threads_after_setup"] = torch.get_num_threads()
        for p in params:  # drop the correctness check's gradients
            p.grad = None
        gc.collect()
        malloc_trim()
        rss_setup = rss_bytes()
        x.requires_grad_(True)

        def one_iter() -> float:
            for p in params:
                p.grad = None
            x.grad = None
            t0 = time.perf_counter()
            out = fn(x)
            torch.autograd.backward(out, grad)  # == out.backward(grad)
            return time.perf_counter() - t0

        for _ in range(WARMUP):
            one_iter()
        # Timing first, on a warm heap; memory afterwards, in one extra iteration from a trimmed heap (the trim
        # makes that iteration page-fault, which would distort a timed one).
        contention = CpuContention()
        times = [one_iter() for _ in range(iters)]
        for p in params:  # the baseline holds parameters and inputs only; gradients count towards the peak
            p.grad = None
        x.grad = None
        gc.collect()
        result["malloc_trim"] = malloc_trim()
        rss_before = rss_bytes()
        result["hwm_reset"] = reset_peak_rss()
        one_iter()
        peak = maxrss_bytes()
        others = contention.others_cores()
        med = statistics.median(times)
        mm_after = matmul_peak_gflops()
        # The machine is shared: the matmul peak is measured before setup and after timing; the higher one is
        # used, and a large gap (or a high load average) marks the row as disturbed by other work.
        result.update(matmul_peak_gflops=max(mm_before, mm_after), matmul_peak_before_gflops=mm_before,
                      matmul_peak_after_gflops=mm_after, others_cores=others)
        result.update(
            times_ms=[t * 1e3 for t in times], median_ms=med * 1e3, min_ms=min(times) * 1e3,
            rss_setup_mb=rss_setup / 2**20, rss_before_timed_mb=rss_before / 2**20, peak_rss_mb=peak / 2**20,
            peak_delta_mb=(peak - rss_before) / 2**20, peak_vs_setup_mb=(peak - rss_setup) / 2**20,
            gflops=work_flops(tokens) / med / 1e9,
        )
        result["fraction_of_mm_peak"] = result["gflops"] / result["matmul_peak_gflops"]
    except Exception as exc:  # any failure becomes this row's reported error, never a number
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    return result


def run_in_subprocess(impl: str, tokens: int, iters: int) -> dict[str, Any]:
    return run_isolated(run_impl, {"impl": impl}, impl, tokens, iters)


def _baseline_block(tree: Path, like: nn.Module) -> nn.Module:
    """``MoEBlock`` from another checkout's ``platform/dlmoe/model/moe.py`` (e.g. ``git archive REV platform``),
    with ``like``'s weights."""
    from dlmoe.model import get_flavor

    source = tree / "platform" / "dlmoe" / "model" / "moe.py"
    spec = importlib.util.spec_from_file_location("baseline_moe", source)
    if spec is None or spec.loader is None or not source.is_file():
        raise FileNotFoundError(f"--baseline {tree}: no {source}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = dataclasses.replace(get_flavor("tiny"), hidden_size=HIDDEN, num_experts=NUM_EXPERTS,
                              num_experts_per_tok=TOP_K, expert_intermediate_size=INTERMEDIATE)
    block: nn.Module = module.MoEBlock(cfg)
    block.load_state_dict(like.state_dict())
    return block


def alternate(tokens: int, rounds: int, baseline: Path | None) -> dict[str, Any]:
    """``ours``, ``gemms`` and, with ``baseline``, another checkout's block, in this one process, one iteration
    of each in turn for ``rounds`` rounds after the warm-up: on a shared machine they see the same disturbances,
    so the per-round ratios are what to read."""
    block, x, grad = _build_ours(tokens)
    blocks = {"ours": block} | ({"baseline": _baseline_block(baseline, block)} if baseline else {})
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        name: (lambda t, b=b: b(t)[0]) for name, b in blocks.items()}
    fns["gemms"] = _setup("gemms", tokens)[0]
    x.requires_grad_(True)

    def one_iter(name: str) -> float:
        x.grad = None
        for p in blocks[name].parameters() if name in blocks else ():
            p.grad = None
        t0 = time.perf_counter()
        torch.autograd.backward(fns[name](x), grad)
        return time.perf_counter() - t0

    for _ in range(WARMUP):
        for name in fns:
            one_iter(name)
    contention = CpuContention()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name in fns:
            times[name].append(one_iter(name))
    ratios = {f"{name}/gemms": [t / g for t, g in zip(times[name], times["gemms"], strict=True)] for name in blocks}
    if baseline:
        ratios["ours/baseline"] = [o / b for o, b in zip(times["ours"], times["baseline"], strict=True)]
    return {"tokens": tokens, "rounds": rounds, "threads": torch.get_num_threads(), "baseline": str(baseline or ""),
            "times_ms": {name: [t * 1e3 for t in v] for name, v in times.items()}, "ratios": ratios,
            "median_ratios": {k: statistics.median(v) for k, v in ratios.items()},
            "others_cores": contention.others_cores()}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    ours = next((r for r in rows if r["impl"] == "ours" and "median_ms" in r), None)
    lines = [table_head("impl", "median ms", "min ms", "time / ours", "peak Δ MB", "GFLOP/s",
                        "mm peak GFLOP/s (before/after)", "% of mm peak", "others' cores",
                        "check: max abs diff (out, grad_x)", align="lrrrrrrrrl")]
    for r in rows:
        if "error" in r:
            lines.append(failed_row(r["impl"], r["error"], 10))
            continue
        ratio = r["median_ms"] / ours["median_ms"] if ours else None
        check = "-"
        if "max_abs_diff_out" in r:
            check = f"{r['check']}: {r['max_abs_diff_out']:.1e}, {r['max_abs_diff_grad_x']:.1e}"
        lines.append(
            f"| {r['impl']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {_fmt(ratio, '.2f')} | "
            f"{r['peak_delta_mb']:.0f} | {r['gflops']:.1f} | {r['matmul_peak_before_gflops']:.0f}/"
            f"{r['matmul_peak_after_gflops']:.0f} | {100 * r['fraction_of_mm_peak']:.0f} % | "
            f"{r['others_cores']:.2f} | {check} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per implementation (default 5)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per iteration (default 4096)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                        help="instead: ours and gemms in turn in one process for ROUNDS rounds (a shared machine)")
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="with --alternate: also another checkout's MoEBlock (git archive REV platform | tar -x)")
    args = parser.parse_args()
    if args.alternate:
        result = alternate(args.tokens, args.alternate, args.baseline)
        medians = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in result["times_ms"].items())
        print(f"{args.alternate} alternating rounds in one process, T={args.tokens}, {result['threads']} threads, "
              f"other processes {result['others_cores']:.2f} cores; median ms: {medians}")
        for key, values in result["ratios"].items():
            print(f"{key}: median of the per-round ratios {result['median_ratios'][key]:.3f} "
                  f"({', '.join(f'{r:.2f}' for r in values)})")
        write_json(args.json, result)
        return
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {IMPLS}")

    allocator = {k: os.environ.get(k) for k in ALLOCATOR_ENV}
    meta = {
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "dtype": "float32", "tokens": args.tokens, "iters": args.iters,
        "warmup": WARMUP, "hidden": HIDDEN, "num_experts": NUM_EXPERTS, "top_k": TOP_K,
        "intermediate": INTERMEDIATE, "work_gflop": work_flops(args.tokens) / 1e9, "allocator_env": allocator,
        "memory_method": MEMORY_METHOD,
    }
    print(f"# MoE layer fwd+bwd, CPU fp32: T={args.tokens} E={NUM_EXPERTS} K={TOP_K} D={HIDDEN} "
          f"I={INTERMEDIATE}, {args.iters} timed iters after {WARMUP} warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# work per iteration: {meta['work_gflop']:.2f} GFLOP (18*T*K*D*I)")
    print("# allocator env: " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in allocator.items()))
    print(f"# memory: {MEMORY_METHOD}")
    quiet = CpuContention()
    time.sleep(1.0)
    others = quiet.others_cores()
    print(f"# other work on this machine before the run: {others:.2f} cores busy (of {os.cpu_count()})")
    print("# mm peak: fp32 2048^3 torch.mm in the row's own process, before setup / after timing (the higher is "
          "used for % of mm peak); others' cores: CPU time used by other processes (and steal) during the timed "
          "iterations, in cores (0 = quiet machine; anything near 1 or more means the row was disturbed)")

    rows = []
    for impl in impls:
        print(f"... running {impl} in a spawn subprocess", file=sys.stderr, flush=True)
        row = run_in_subprocess(impl, args.tokens, args.iters)
        if "error" in row:
            print(f"!!! {impl} failed: {row['error']}", file=sys.stderr)
            if "traceback" in row:
                print(row["traceback"], file=sys.stderr)
        elif not row.get("hwm_reset", True):
            print(f"# note: {impl}: RSS high-water reset refused; its peak is since process start", flush=True)
        rows.append(row)

    print()
    print(markdown_table(rows))
    ours = next((r for r in rows if r["impl"] == "ours" and "median_ms" in r), None)
    ratios: dict[str, float | None] = {}
    print()
    for name in ("deepspeed", "naive", "autoep", "gemms"):
        r = next((r for r in rows if r["impl"] == name), None)
        if r is None:
            continue
        key = f"time({name})/time(ours)"
        ratios[key] = r["median_ms"] / ours["median_ms"] if ours and "median_ms" in r else None
        print(f"{key} = {_fmt(ratios[key], '.2f')}" + ("" if ratios[key] is not None else
                                                          f"  ({r.get('error', 'ours missing')})"))
    for r in rows:
        if r["impl"] == "autoep" and "matches" in r and not r["matches"]:
            print("# warning: AutoEP output differs from ours by more than 1e-4")
    if write_json(args.json, {"meta": meta, "rows": rows, "ratios": ratios}):
        print(f"\n# wrote {args.json}")


if __name__ == "__main__":
    main()
