"""Expert parallelism on 2 CPU processes (gloo), checked against single-process results.

One module-scoped run starts two worker processes (this file, run as a script, see `tests.parallel.spawn`)
that run every check in turn; each rank writes its verdict per check to a JSON file, and the tests below
read them.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moeify
from moeify import MoEConfig, MoELayer
from tests.parallel.spawn import init_group, run_checks, spawn, verdict

WORLD = 2
TOL = 1e-5
D, H, T = 8, 12, 10


def make_layer(capacity: float | None = None, num_experts: int = 4, seed: int = 0) -> MoELayer:
    cfg = MoEConfig(
        d_model=D,
        d_ff=H,
        num_experts=num_experts,
        k=2,
        activation="silu",
        gated=True,
        bias=True,
        capacity_factor=capacity,
    )
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    with torch.no_grad():  # non-zero biases so their gradients and sharding are exercised
        layer.b1.normal_(std=0.1)
        layer.b2.normal_(std=0.1)
    return layer


class Tiny(nn.Module):
    """Replicated params around one MoE layer: what data parallelism must handle next to the experts."""

    def __init__(self, num_experts: int = 4, seed: int = 0, capacity: float | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        self.moe = make_layer(capacity, num_experts, seed + 1)
        torch.manual_seed(seed + 2)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s input tokens [T, D] and a fixed cotangent [T, D] that defines its loss."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def probe() -> torch.Tensor:
    return torch.randn(6, D, generator=torch.Generator().manual_seed(7))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------------------- worker side
def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_close(what: str, got, want) -> None:
    diff = max_diff(got, want)
    if got.shape != want.shape or not diff <= TOL:
        raise AssertionError(f"{what}: max diff {diff:.3g}, shapes {tuple(got.shape)} {tuple(want.shape)}")


def check_ep_layer(rank: int, capacity: float | None, skewed: bool = False) -> None:
    """ExpertParallel alone (grad_scale 1): sum of the ranks' losses, compared with one process.

    skewed: every token picks experts 0 and 1 (rank 0's), so rank 1 computes nothing and receives no
    rows; both ranks must still run every exchange, forward and backward.
    """
    from moeify.parallel import shard_experts

    ref = make_layer(capacity)
    data = rank_data
    if skewed:
        with torch.no_grad():  # positive inputs, experts 0/1 score +, experts 2/3 score -
            ref.router.weight.copy_(torch.tensor([1.0, 1.1, -1.0, -1.1]).unsqueeze(1).expand(4, D))

        def data(r):
            x, cot = rank_data(r)
            return x.abs() + 0.5, cot

    ep = copy.deepcopy(ref)
    shard_experts(ep)
    L = ep.num_experts // WORLD
    names = ["w1", "b1", "w2", "b2"]
    expert_grads = {n: torch.zeros_like(getattr(ref, n)) for n in names}
    for s in range(WORLD):  # single process: every rank's batch through the full layer
        x, cot = data(s)
        x.requires_grad_(True)
        out = ref(x)
        loss = (out * cot).sum() + moeify.aux_loss(ref)
        grads = torch.autograd.grad(loss, [x, ref.router.weight] + [getattr(ref, n) for n in names])
        for n, g in zip(names, grads[2:], strict=True):
            expert_grads[n] += g
        if s == rank:
            want_out, want_dx, want_router = out.detach(), grads[0], grads[1]
    x, cot = data(rank)
    x.requires_grad_(True)
    out = ep(x)
    loss = (out * cot).sum() + moeify.aux_loss(ep)
    loss.backward()
    _check_close("output", out, want_out)
    _check_close("input grad", x.grad, want_dx)
    _check_close("router grad", ep.router.weight.grad, want_router)
    for n in names:
        local = getattr(ep, n).grad.to_local()
        _check_close(f"{n} grad", local, expert_grads[n][rank * L : (rank + 1) * L])
    sent = int(ep.expert_parallel.last_sent.sum())
    kept = int((ep.last_stats.tokens_per_expert).sum())
    routing = ep.router(x.detach())
    keep = routing.expert_idx < ep.num_experts
    pairs = torch.unique(routing.token_idx[keep] * WORLD + routing.expert_idx[keep] // L).numel()
    if sent != pairs:  # one row per (token, destination rank): rank 1's batch has tokens with both on one
        raise AssertionError(f"sent {sent} rows for {kept} kept assignments, {pairs} (token, rank) pairs")
    if capacity is not None and ep.last_stats.dropped_fraction == 0:
        raise AssertionError("the capacity case dropped nothing; make the capacity smaller")
    if skewed and ep.expert_parallel.last_local_load.sum() != (2 * T * WORLD if rank == 0 else 0):
        raise AssertionError(f"skewed routing: rank {rank} computed {ep.expert_parallel.last_local_load}")


def _reference_mean_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Single process: gradients of the mean over ranks of the ranks' losses."""
    model.zero_grad()
    for s in range(WORLD):
        x, cot = rank_data(s)
        loss = ((model(x) * cot).sum() + moeify.aux_loss(model)) / WORLD
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def check_parallelize(rank: int, dp: str) -> None:
    """parallelize + DDP/FSDP2: all gradients equal single-process gradients of the mean loss."""
    from moeify.parallel import clip_grad_norm_, parallelize

    ref = Tiny()
    want = _reference_mean_grads(ref)
    want_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()]))
    par = parallelize(copy.deepcopy(Tiny()), dp=dp)
    x, cot = rank_data(rank)
    loss = (par(x) * cot).sum() + moeify.aux_loss(par)
    loss.backward()
    inner = par.module if dp == "ddp" else par
    for name, p in inner.named_parameters():
        _check_close(f"{name} grad ({dp})", _full(p.grad), want[name])
    norm = clip_grad_norm_(par.parameters(), max_norm=1e9)
    if abs(float(norm) - float(want_norm)) > 1e-4 * float(want_norm):
        raise AssertionError(f"clip_grad_norm_ {float(norm)} vs single-process {float(want_norm)}")


def step_and_save(par: nn.Module, rank: int, outdir: Path, name: str) -> tuple[torch.Tensor, dict]:
    """Train the DDP-wrapped parallel model one AdamW step, save it to outdir/name with DCP, and (rank 0)
    what a load must reproduce to outdir/name.pt; returns the probe output and the full parameters."""
    from moeify.parallel import save_checkpoint

    opt = torch.optim.AdamW(par.parameters(), lr=1e-2)
    x, cot = rank_data(rank)
    ((par(x) * cot).sum() + moeify.aux_loss(par)).backward()
    opt.step()
    save_checkpoint(par, outdir / name, optimizer=opt)
    with torch.no_grad():
        out = par(probe())
    state = {n: _full(p.detach()) for n, p in par.module.named_parameters()}  # collectives on all ranks
    exp_avg = {n: _full(opt.state[p]["exp_avg"]) for n, p in par.module.named_parameters()}
    if rank == 0:
        torch.save({"out": out, "state": state, "exp_avg": exp_avg}, outdir / f"{name}.pt")
    return out, state


def check_loads_in_one_process(outdir: Path, name: str) -> None:
    """Test side: the checkpoint `step_and_save` wrote loads into one plain model, optimizer included."""
    from moeify.parallel import load_checkpoint

    expected = torch.load(outdir / f"{name}.pt", weights_only=True)
    model = Tiny(seed=99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint(model, outdir / name, optimizer=opt)
    for pname, p in model.named_parameters():
        assert max_diff(p, expected["state"][pname]) == 0, pname
        assert max_diff(opt.state[p]["exp_avg"], expected["exp_avg"][pname]) == 0, pname
    with torch.no_grad():
        assert max_diff(model(probe()), expected["out"]) <= TOL


def check_checkpoint_save(rank: int, outdir: Path) -> None:
    """2 ranks train a step, save with DCP; the test process loads it into one plain model."""
    from moeify.parallel import parallelize

    step_and_save(parallelize(Tiny(), dp="ddp"), rank, outdir, "ckpt2")


def check_checkpoint_load(rank: int, outdir: Path) -> None:
    """A checkpoint written by one plain process loads into the 2-rank parallel model."""
    from moeify.parallel import load_checkpoint, parallelize

    par = parallelize(Tiny(seed=123), dp="ddp")  # different weights, all overwritten by the load
    load_checkpoint(par, outdir / "ckpt1")
    expected = torch.load(outdir / "expected1.pt", weights_only=True)
    with torch.no_grad():
        out = par(probe())
    _check_close("output after 1 -> 2 load", out, expected["out"])
    L = 4 // WORLD
    _check_close(
        "w1 shard after 1 -> 2 load", par.module.moe.w1.to_local(), expected["w1"][rank * L : (rank + 1) * L]
    )


def check_not_divisible(rank: int) -> None:
    from moeify.parallel import ParallelError, parallelize

    try:
        parallelize(Tiny(num_experts=3))
    except ParallelError as e:
        if "not divisible" not in str(e) or "(3)" not in str(e) or "(2)" not in str(e):
            raise AssertionError(f"unclear message: {e}") from e
        return
    raise AssertionError("no error for 3 experts on 2 ranks")


def check_tied_router_refused(rank: int) -> None:
    """A router that reads its layer's expert weights (Avg-K tied) cannot run on sharded w1: refused up front,
    naming the layer and the untied alternative, and the model is left unsharded."""
    from torch.distributed.tensor import DTensor

    from moeify.parallel import ParallelError, parallelize

    model = Tiny()
    model.moe = MoELayer(MoEConfig(d_model=D, d_ff=H, num_experts=4, k=2, router="avg_k"))
    try:
        parallelize(model)
    except ParallelError as e:
        if "'moe'" not in str(e) or "router_init='avg_k'" not in str(e) or "\n" in str(e):
            raise AssertionError(f"unclear message: {e}") from e
        if isinstance(model.moe.w1, DTensor):
            raise AssertionError("the refused model was sharded anyway") from e
        return
    raise AssertionError("no error for the tied avg_k router under expert parallelism")


def worker(rank: int, outdir: Path) -> None:
    init_group(rank, WORLD, outdir)
    checks = {
        "ep_topk": lambda: check_ep_layer(rank, None),
        "ep_topk_capacity": lambda: check_ep_layer(rank, 0.5),
        "ep_topk_skewed": lambda: check_ep_layer(rank, None, skewed=True),
        "parallelize_ddp": lambda: check_parallelize(rank, "ddp"),
        "parallelize_fsdp": lambda: check_parallelize(rank, "fsdp"),
        "checkpoint_save": lambda: check_checkpoint_save(rank, outdir),
        "checkpoint_load": lambda: check_checkpoint_load(rank, outdir),
        "not_divisible": lambda: check_not_divisible(rank),
        "tied_router_refused": lambda: check_tied_router_refused(rank),
    }
    run_checks(rank, outdir, checks)


# ------------------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    from moeify.parallel import save_checkpoint

    outdir = tmp_path_factory.mktemp("ep")
    # the single-process checkpoint the workers load (1 -> 2)
    model = Tiny(seed=5)
    save_checkpoint(model, outdir / "ckpt1")
    with torch.no_grad():
        torch.save({"out": model(probe()), "w1": model.moe.w1.detach().clone()}, outdir / "expected1.pt")

    results, logs = spawn(__file__, WORLD, outdir)
    return outdir, results, logs


def _verdict(ep_run, check: str) -> None:
    verdict(ep_run[1], ep_run[2], check)


@pytest.mark.parametrize("check", ["ep_topk", "ep_topk_capacity", "ep_topk_skewed"])
def test_expert_parallel_matches_single_process(ep_run, check):
    _verdict(ep_run, check)


@pytest.mark.parametrize("dp", ["ddp", "fsdp"])
def test_parallelize_gradients_match_single_process(ep_run, dp):
    _verdict(ep_run, f"parallelize_{dp}")


def test_checkpoint_two_ranks_to_one_process(ep_run):
    _verdict(ep_run, "checkpoint_save")
    check_loads_in_one_process(ep_run[0], "ckpt2")


def test_checkpoint_one_process_to_two_ranks(ep_run):
    _verdict(ep_run, "checkpoint_load")


def test_not_divisible_clear_error(ep_run):
    _verdict(ep_run, "not_divisible")


def test_tied_router_refused(ep_run):
    _verdict(ep_run, "tied_router_refused")


def test_parallelize_needs_process_group():
    from moeify.parallel import ParallelError

    with pytest.raises(ParallelError, match="init_process_group"):
        moeify.parallelize(Tiny())


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
