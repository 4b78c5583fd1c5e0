"""SMILE bi-level routing under the bi-level exchange: 4 CPU processes (gloo) as 2 "nodes" x 2, the layer's
router the `smile` router with router_groups=2 (node gate, then local gate), checked against one process.

- forward and every gradient equal one process's (<= 1e-5), for top-1 (the paper) and top-2 inside the node;
- the first all_to_all sends each token to its chosen node exactly once;
- a router whose groups straddle the mesh's nodes is refused.

One module-scoped run of 4 worker processes (this file as a script, see `tests.parallel.spawn`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moeify
from moeify import MoEConfig, MoELayer
from tests.parallel.spawn import init_group, run_checks, spawn, verdict
from tests.parallel.test_mesh import reference
from tests.parallel.test_parallel import D, H, T, Tiny, _check_close, _full, rank_data

WORLD, NODES = 4, 2


def smile_tiny(k: int, num_experts: int = 8, groups: int = NODES) -> nn.Module:
    """`Tiny` whose MoE layer routes bi-level: `groups` nodes of num_experts / groups experts."""
    model = Tiny(num_experts=num_experts)
    cfg = MoEConfig(d_model=D, d_ff=H, num_experts=num_experts, k=k, router="smile", router_groups=groups,
                    activation="silu", gated=True, bias=True)
    torch.manual_seed(1)
    model.moe = MoELayer(cfg)
    with torch.no_grad():
        model.moe.b1.normal_(std=0.1)
        model.moe.b2.normal_(std=0.1)
        model.moe.router.weight.normal_(std=0.5)  # both nodes chosen, away from ties
    return model


def check_smile(rank: int, k: int) -> None:
    """parallelize(bilevel=True) + DDP with the smile router: outputs and gradients equal one process's, and
    each token's row goes to its chosen node once."""
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.parallel import CommTimer, parallelize

    want_out, want = reference(smile_tiny(k), rank)
    mesh = init_device_mesh("cpu", (NODES, WORLD // NODES), mesh_dim_names=("node", "local"))
    timer = CommTimer(node_of=lambda r: r // (WORLD // NODES))
    par = parallelize(smile_tiny(k), ep_mesh=mesh, bilevel=True, timer=timer)
    inner = par.module
    x, cot = rank_data(rank)
    out = par(x)
    with torch.no_grad():
        experts = inner.moe.router(inner.inp(x)).expert_idx.reshape(T, k)  # [T, K]
    node = experts // (inner.moe.num_experts // NODES)  # [T, K]
    if not torch.equal(node.min(dim=1).values, node.max(dim=1).values):
        raise AssertionError(f"a token's experts span two nodes: {experts.tolist()}")
    want_sent = torch.bincount(node[:, 0], minlength=NODES).tolist()
    sent = inner.moe.expert_parallel.last_sent.tolist()  # rows to each node (own included)
    other = 1 - mesh["node"].get_local_rank()
    want_messages = 5 if want_sent[other] else 0  # counts, rows, assignments, weights, combine
    if sent != want_sent or timer.node_messages != want_messages:
        raise AssertionError(f"sent {sent} rows to the nodes for tokens choosing them {want_sent}, in "
                             f"{timer.node_messages} cross-node messages (want {want_messages})")
    ((out * cot).sum() + moeify.aux_loss(par)).backward()
    _check_close(f"output (smile k={k})", out, want_out)
    for name, p in inner.named_parameters():
        _check_close(f"{name} grad (smile k={k})", _full(p.grad), want[name])


def check_groups_must_fit_nodes(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.parallel import ParallelError, parallelize

    mesh = init_device_mesh("cpu", (NODES, WORLD // NODES), mesh_dim_names=("node", "local"))
    try:  # 3 groups of 4 experts over 2 nodes of 6: the middle group straddles both
        parallelize(smile_tiny(k=1, num_experts=12, groups=3), ep_mesh=mesh, bilevel=True)
    except ParallelError as e:
        if "straddle" not in str(e) or "router_groups" not in str(e):
            raise AssertionError(f"message lacks what to do: {e}") from e
        return
    raise AssertionError("no ParallelError for 3 router groups on 2 nodes")


def worker(rank: int, outdir: Path) -> None:
    init_group(rank, WORLD, outdir)
    checks = {
        "smile_top1": lambda: check_smile(rank, k=1),
        "smile_top2": lambda: check_smile(rank, k=2),
        "groups_fit_nodes": lambda: check_groups_must_fit_nodes(rank),
    }
    run_checks(rank, outdir, checks)


# ------------------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def smile_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("smile")
    results, logs = spawn(__file__, WORLD, outdir)
    return results, logs


@pytest.mark.slow
@pytest.mark.parametrize("check", ["smile_top1", "smile_top2"])
def test_smile_bilevel_matches_single_process(smile_run, check):
    verdict(*smile_run, check)


@pytest.mark.slow
def test_router_groups_must_fit_the_nodes(smile_run):
    verdict(*smile_run, "groups_fit_nodes")


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
