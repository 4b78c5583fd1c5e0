"""Expert parallelism over 2-D meshes on 4 CPU processes (gloo), checked against one process.

- EP x DP: ('dp', 'ep') = 2 x 2, experts sharded over 'ep' and replicated over 'dp'; with top-k routing,
  with routing so skewed that one expert-parallel rank receives nothing, and with the soft router.
- Bi-level (SMILE): ('node', 'local') = 2 x 2, tokens cross nodes first, then move inside the node.
- A DCP checkpoint written by EP2 x DP2 loads into one plain process.

One module-scoped run of 4 worker processes (this file as a script, see `tests.parallel.spawn`) runs
every check; the tests read the verdicts. Every rank compares with a single-process reference that runs
all 4 ranks' batches through an unsharded copy of the model.
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
from tests.parallel.test_parallel import (
    D,
    H,
    Tiny,
    _check_close,
    _full,
    check_loads_in_one_process,
    probe,
    rank_data,
    step_and_save,
)

WORLD = 4


def tiny(kind: str = "topk", num_experts: int = 4) -> nn.Module:
    """`Tiny` with a top-k router, a router skewed onto experts 0 and 1, or the soft router."""
    model = Tiny(num_experts=num_experts)
    if kind == "soft":
        cfg = MoEConfig(
            d_model=D,
            d_ff=H,
            num_experts=num_experts,
            router="soft",
            slots_per_expert=3,
            activation="silu",
            gated=True,
            bias=True,
        )
        torch.manual_seed(1)
        model.moe = MoELayer(cfg)
    elif kind == "skewed":  # every token scores experts 0/1 (expert-parallel rank 0's) highest
        with torch.no_grad():
            model.inp.weight.copy_(0.1 * torch.eye(D))  # inputs are randn: h = 0.1 x + 1 > 0
            model.inp.bias.fill_(1.0)
            score = torch.tensor([1.0, 1.1, -1.0, -1.1])
            model.moe.router.weight.copy_(score.unsqueeze(1).expand(4, D))
    return model


def reference(model: nn.Module, rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process: this rank's output, and the gradients of the mean over ranks of the ranks' losses."""
    model.zero_grad()
    for s in range(WORLD):
        x, cot = rank_data(s)
        out = model(x)
        if s == rank:
            mine = out.detach()
        (((out * cot).sum() + moeify.aux_loss(model)) / WORLD).backward()
    return mine, {n: p.grad.clone() for n, p in model.named_parameters()}


def check_mesh(
    rank: int, mesh_shape: tuple, names: tuple, kind: str = "topk", num_experts: int = 4, dp: str = "ddp"
) -> None:
    """parallelize over `ep_mesh` + DDP/FSDP2: outputs and every gradient equal one process's."""
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.parallel import CommTimer, clip_grad_norm_, parallelize

    want_out, want = reference(tiny(kind, num_experts), rank)
    want_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()]))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    timer = CommTimer(node_of=lambda r: r // mesh_shape[1])
    par = parallelize(tiny(kind, num_experts), ep_mesh=mesh, bilevel="node" in names, timer=timer, dp=dp)
    inner = par.module if dp == "ddp" else par
    x, cot = rank_data(rank)
    out = par(x)
    if "node" in names and kind == "topk":
        check_bilevel_traffic(inner, x, mesh["node"].get_local_rank(), timer)
    ((out * cot).sum() + moeify.aux_loss(par)).backward()
    _check_close(f"output ({kind}, {names})", out, want_out)
    for name, p in inner.named_parameters():
        _check_close(f"{name} grad ({kind}, {names}, {dp})", _full(p.grad), want[name])
    load = inner.moe.expert_parallel.last_local_load
    if kind == "skewed" and mesh["ep"].get_local_rank() == 1 and int(load.sum()) != 0:
        raise AssertionError(f"skewed routing: expert-parallel rank 1 computed {load.tolist()}")
    norm = clip_grad_norm_(par.parameters(), max_norm=1e9)
    if abs(float(norm) - float(want_norm)) > 1e-4 * float(want_norm):
        raise AssertionError(f"clip_grad_norm_ {float(norm)} vs single-process {float(want_norm)}")


def check_bilevel_traffic(model: nn.Module, x: torch.Tensor, node: int, timer) -> None:
    """After a bi-level forward: a token crossed to the other node once if it has experts there, and the
    node boundary carried 5 messages (counts, rows, assignments, weights, combine)."""
    routing = model.moe.router(model.inp(x))
    half = model.moe.num_experts // 2  # experts per node
    other = 1 - node
    want_rows = routing.token_idx[routing.expert_idx // half == other].unique().numel()
    sent = model.moe.expert_parallel.last_sent.tolist()  # rows to each node
    if sent[other] != want_rows or timer.node_messages != 5:
        raise AssertionError(
            f"sent {sent[other]} rows to node {other} for {want_rows} tokens with experts "
            f"there, in {timer.node_messages} cross-node messages"
        )


def check_checkpoint_save(rank: int, outdir: Path) -> None:
    """EP2 x DP2 trains a step and saves with DCP; the checkpoint loads into the bi-level layout (EP over
    all 4 ranks) here, and the test process loads it into one plain model."""
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.parallel import load_checkpoint, parallelize

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    out, state = step_and_save(parallelize(tiny(), ep_mesh=mesh), rank, outdir, "ckpt_mesh")
    bilevel = init_device_mesh("cpu", (2, 2), mesh_dim_names=("node", "local"))
    other = parallelize(Tiny(seed=123), ep_mesh=bilevel, bilevel=True)  # weights all overwritten
    load_checkpoint(other, outdir / "ckpt_mesh")
    with torch.no_grad():
        _check_close("output after DP2 x EP2 -> bi-level 2 x 2 load", other(probe()), out)
    _check_close(
        "w1 shard after DP2 x EP2 -> bi-level 2 x 2 load",
        other.module.moe.w1.to_local(),
        state["moe.w1"][rank : rank + 1],
    )


def check_mesh_errors(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from moeify.parallel import ParallelError, parallelize

    cases = [
        (dict(ep_mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")), bilevel=True), "bilevel"),
        (dict(ep_mesh=init_device_mesh("cpu", (2, 2))), "mesh_dim_names"),
        (dict(bilevel=True), "ep_mesh"),
    ]
    for kwargs, needle in cases:
        try:
            parallelize(tiny(), **kwargs)
        except ParallelError as e:
            if needle not in str(e):
                raise AssertionError(f"{kwargs}: message lacks {needle!r}: {e}") from e
            continue
        raise AssertionError(f"no ParallelError for {kwargs}")


def worker(rank: int, outdir: Path) -> None:
    init_group(rank, WORLD, outdir)
    dp_ep, node_local = ("dp", "ep"), ("node", "local")
    checks = {
        "dp_ep": lambda: check_mesh(rank, (2, 2), dp_ep),
        "dp_ep_skewed": lambda: check_mesh(rank, (2, 2), dp_ep, "skewed"),
        "dp_ep_soft": lambda: check_mesh(rank, (2, 2), dp_ep, "soft"),
        "dp_ep_fsdp": lambda: check_mesh(rank, (2, 2), dp_ep, dp="fsdp"),
        "bilevel": lambda: check_mesh(rank, (2, 2), node_local, num_experts=8),
        "bilevel_soft": lambda: check_mesh(rank, (2, 2), node_local, "soft"),
        "checkpoint_save": lambda: check_checkpoint_save(rank, outdir),
        "errors": lambda: check_mesh_errors(rank),
    }
    run_checks(rank, outdir, checks)


# ------------------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("mesh")
    results, logs = spawn(__file__, WORLD, outdir)
    return outdir, results, logs


@pytest.mark.parametrize("check", ["dp_ep", "dp_ep_skewed", "dp_ep_soft", "dp_ep_fsdp"])
def test_ep_x_dp_matches_single_process(mesh_run, check):
    verdict(mesh_run[1], mesh_run[2], check)


@pytest.mark.parametrize("check", ["bilevel", "bilevel_soft"])
def test_bilevel_matches_single_process(mesh_run, check):
    verdict(mesh_run[1], mesh_run[2], check)


def test_mesh_options_clear_errors(mesh_run):
    verdict(mesh_run[1], mesh_run[2], "errors")


def test_checkpoint_ep_x_dp_to_one_process(mesh_run):
    verdict(mesh_run[1], mesh_run[2], "checkpoint_save")
    check_loads_in_one_process(mesh_run[0], "ckpt_mesh")


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
