"""Load-balance loss, router z-loss, expert-load statistics and aux-loss-free balancing, against hand values."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline.local_s3 import free_port
from dlmoe.model import build_model, get_flavor
from dlmoe.model.balance import AuxFreeBalancer, expert_load, load_balance_loss, router_z_loss
from dlmoe.model.moe import RouterStats


def stats_from(scores: list[list[float]], counts: list[int], logits: list[list[float]] | None = None) -> RouterStats:
    s = torch.tensor(scores)
    return RouterStats(logits_TE=torch.tensor(logits) if logits else s.log(), scores_TE=s,
                       tokens_per_expert_E=torch.tensor(counts), experts_TK=s.argmax(-1, keepdim=True))


def test_balance_loss_is_one_at_perfect_balance() -> None:
    stats = stats_from([[0.8, 0.2], [0.2, 0.8]], [1, 1])
    assert load_balance_loss([stats]).item() == pytest.approx(1.0)


def test_balance_loss_hand_value_and_layer_mean() -> None:
    # f = [1, 0] (both slots to expert 0), P = [0.8, 0.2] -> E * sum f P = 2 * 0.8 = 1.6
    skewed = stats_from([[0.9, 0.1], [0.7, 0.3]], [2, 0])
    balanced = stats_from([[0.8, 0.2], [0.2, 0.8]], [1, 1])
    assert load_balance_loss([skewed]).item() == pytest.approx(1.6)
    assert load_balance_loss([skewed, balanced]).item() == pytest.approx(1.3)


def test_balance_loss_gradient_flows_through_scores_only() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.7, 0.3]], requires_grad=True)
    stats = RouterStats(logits_TE=scores.log(), scores_TE=scores, tokens_per_expert_E=torch.tensor([2, 0]),
                        experts_TK=torch.zeros(2, 1, dtype=torch.long))
    load_balance_loss([stats]).backward()
    assert scores.grad is not None
    # d/dP_0 of 2 * (1 * mean(P_0)) = 2 / T = 1 for each token's expert-0 score; expert 1 has f = 0.
    torch.testing.assert_close(scores.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_counts_override_replaces_local_counts() -> None:
    stats = stats_from([[0.9, 0.1], [0.7, 0.3]], [2, 0])
    loss = load_balance_loss([stats], counts_LE=torch.tensor([[1, 1]]))
    assert loss.item() == pytest.approx(2 * (0.5 * 0.8 + 0.5 * 0.2))


def test_all_padding_layer_gives_finite_zero_loss() -> None:
    empty = RouterStats(logits_TE=torch.zeros(0, 2), scores_TE=torch.zeros(0, 2), tokens_per_expert_E=torch.zeros(2),
                        experts_TK=torch.zeros(0, 1, dtype=torch.long))
    assert load_balance_loss([empty]).item() == 0.0
    assert router_z_loss([empty]).item() == 0.0


def test_z_loss_hand_value() -> None:
    stats = stats_from([[0.5, 0.5]], [1, 0], logits=[[0.0, 0.0]])
    assert router_z_loss([stats]).item() == pytest.approx(math.log(2) ** 2)
    stats2 = stats_from([[0.5, 0.5], [0.5, 0.5]], [1, 1], logits=[[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert router_z_loss([stats2]).item() == pytest.approx(expected, rel=1e-6)


def test_expert_load_summary() -> None:
    load = expert_load(torch.tensor([[4, 4, 4, 4], [8, 8, 0, 0]]))
    torch.testing.assert_close(load.share_LE, torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(load.max_over_mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(load.coefficient_of_variation, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(load.normalized_entropy, torch.tensor([1.0, 0.5]))
    assert load.dead_experts.tolist() == [0, 2]
    metrics = load.as_metrics()
    assert metrics["moe/layer1/dead_experts"] == 2.0
    assert metrics["moe/max_over_mean"] == pytest.approx(2.0)  # the worst layer's, not the mean 1.5


def test_aux_free_balancer_moves_bias_toward_underloaded_experts() -> None:
    model = build_model(get_flavor("debug"))
    balancer = AuxFreeBalancer(model, rate=0.01)
    counts = torch.tensor([[10, 0, 5, 5, 5, 5, 5, 5], [5] * 8])
    balancer.update(counts)
    bias0 = balancer.routers[0].selection_bias_E
    assert bias0[0].item() == pytest.approx(-0.01)
    assert bias0[1].item() == pytest.approx(0.01)
    assert torch.count_nonzero(balancer.routers[1].selection_bias_E) == 0
    with pytest.raises(ValueError, match="layers"):
        balancer.update(torch.ones(3, 8))


def _global_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # Rank 0 routes everything to expert 0, rank 1 everything to expert 1: globally balanced.
    scores = [[0.9, 0.1], [0.9, 0.1]] if rank == 0 else [[0.1, 0.9], [0.1, 0.9]]
    counts = [2, 0] if rank == 0 else [0, 2]
    stats = stats_from(scores, counts)
    local = load_balance_loss([stats]).item()
    global_ = load_balance_loss([stats], global_counts=True).item()
    Path(out_dir, f"rank{rank}.txt").write_text(f"{local} {global_}")
    dist.destroy_process_group()


def test_global_counts_are_all_reduced_across_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_global_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        local, global_ = map(float, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert local == pytest.approx(1.8)  # 2 * 1.0 * 0.9
        assert global_ == pytest.approx(1.0)  # f = [0.5, 0.5] over both ranks: 2 * 0.5 * (0.9 + 0.1)
