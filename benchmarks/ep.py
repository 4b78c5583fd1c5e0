"""Expert-parallel throughput on CPU: 1 process vs 2 processes (gloo), with the all-to-all share; traffic.

    python benchmarks/ep.py            # spawns the worker processes itself
    python benchmarks/ep.py --quick
    python benchmarks/ep.py --traffic  # only the traffic table (bytes and messages do not depend on load)

Every process trains one MoE layer on its own batch of T tokens (forward + backward + SGD step), one
intra-op thread per process, so 2 processes use 2 cores. Rows:
  local, 1 process     the plain layer (no exchange): the baseline
  EP, 1 process        the expert-parallel path over a group of one (the exchanges' fixed cost)
  EP, 2 processes      experts sharded 2 ways; tokens/s counts both processes' tokens
Step time is the median over the timed steps of the slowest rank's step, then the median over rounds
(the configurations run interleaved, round after round, so a busy machine slows them alike); "all-to-all"
is the wall time spent inside the exchanges (counts, dispatch, combine; forward and backward), waiting
for the other rank included, as a share of the step.

The traffic table counts what one training step (forward + backward, same batches) sends between ranks,
summed over ranks: bytes and messages (non-empty sends, every exchange including the counts). On 4
processes laid out as 2 "nodes" x 2, it also counts what crosses the node boundary:
  per assignment   a token row is sent once per expert assignment (what deduplication replaces)
  dedupe           once per destination rank (the default)
  bi-level         once per destination node, then once per rank inside it (SMILE's exchange; dedupe at both
                   stages), with the layer's flat top-2 router: a token's two experts may sit on both nodes
  bi-level, SMILE  the same exchange with SMILE's bi-level router (`router="smile"`, router_groups = nodes):
                   top-1 node, then top-2 inside it, so a token crosses the node boundary at most once
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LOCAL = 2  # ranks per "node" in the traffic table
TRAFFIC_MODES = ("per-assignment", "dedupe", "bilevel", "bilevel-smile")


def worker(rank: int, world: int, mode: str, store: str, args: dict) -> dict:
    import datetime

    import torch.distributed as dist

    import moeify
    from moeify.parallel import CommTimer, shard_experts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    router = dict(router="smile", router_groups=world // LOCAL) if mode == "bilevel-smile" else {}
    cfg = moeify.MoEConfig(d_model=args["d"], d_ff=args["h"], num_experts=args["e"], k=2, activation="silu",
                           gated=True, **router)
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg)
    timer = CommTimer(node_of=lambda r: r // LOCAL)
    if mode == "ep":
        shard_experts(layer, timer=timer, grad_scale=1.0 / world)
    elif mode in TRAFFIC_MODES:
        mesh = None
        if mode.startswith("bilevel"):
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world // LOCAL, LOCAL), mesh_dim_names=("node", "local"))
        shard_experts(layer, timer=timer, grad_scale=1.0 / world, mesh=mesh, bilevel=mesh is not None,
                      dedupe=mode != "per-assignment")
        args = dict(args, warmup=0, steps=1)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(args["t"], args["d"], generator=torch.Generator().manual_seed(rank))  # [T, D]
    steps, comm = [], []
    traffic = torch.zeros(4, dtype=torch.float64)
    for i in range(args["warmup"] + args["steps"]):
        dist.barrier()
        timer.reset()
        start = time.perf_counter()
        out = layer(x)
        (out.square().mean() + moeify.aux_loss(layer)).backward()
        opt.step()
        opt.zero_grad()
        elapsed = torch.tensor([time.perf_counter() - start, timer.seconds], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if i >= args["warmup"]:
            steps.append(float(elapsed[0]))
            comm.append(float(elapsed[1]))
            traffic = torch.tensor([timer.bytes, timer.messages, timer.node_bytes, timer.node_messages],
                                   dtype=torch.float64)
    dist.all_reduce(traffic)  # summed over ranks (last step)
    dist.destroy_process_group()
    return {"step_s": statistics.median(steps), "comm_s": statistics.median(comm),
            "traffic": [int(v) for v in traffic.tolist()]}


def run(world: int, mode: str, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")]))
        if "GLOO_SOCKET_IFNAME" not in env and sys.platform.startswith("linux"):
            env["GLOO_SOCKET_IFNAME"] = "lo"
        store = str(Path(tmp) / "store")
        cmd = [sys.executable, __file__, "--worker", json.dumps(args), mode, str(world), store]
        procs = [subprocess.Popen(cmd + [str(r)], env=env, stdout=subprocess.PIPE, text=True)
                 for r in range(world)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{mode} on {world} processes failed")
        return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--traffic", action="store_true", help="only the traffic table")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repetitions (default 3, quick 1)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        mode, world, store, rank = a.rest
        print(json.dumps(worker(int(rank), int(world), mode, store, json.loads(a.worker))), flush=True)
        return
    args = dict(t=256, d=64, h=128, e=8, warmup=2, steps=5) if a.quick else \
        dict(t=2048, d=256, h=512, e=8, warmup=3, steps=15)
    print(f"MoE layer d_model={args['d']} d_ff={args['h']} experts={args['e']} k=2 (SwiGLU), "
          f"{args['t']} tokens per process per step, fwd+bwd+SGD, 1 thread per process, gloo")
    if a.traffic:
        print_traffic(args)
        return
    rounds = a.rounds or (1 if a.quick else 3)
    configs = (("local, 1 process", 1, "local"), ("EP, 1 process", 1, "ep"), ("EP, 2 processes", 2, "ep"))
    results = {label: [] for label, _, _ in configs}
    for _ in range(rounds):
        for label, world, mode in configs:
            results[label].append(run(world, mode, args))
    load = f", 1-min load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"{rounds} rounds, medians; {os.cpu_count()} cores{load}")
    print(f"{'config':<20}{'tokens/step':>12}{'step ms':>10}{'tokens/s':>11}{'vs local':>10}"
          f"{'all-to-all':>12}")
    base = None
    for label, world, _ in configs:
        runs = results[label]
        r = {key: statistics.median(x[key] for x in runs) for key in ("step_s", "comm_s")}
        tokens = args["t"] * world
        tps = tokens / r["step_s"]
        base = base or tps
        share = r["comm_s"] / r["step_s"]
        print(f"{label:<20}{tokens:>12}{r['step_s'] * 1e3:>10.1f}{tps:>11.0f}{tps / base:>9.2f}x"
              f"{share:>11.1%}", flush=True)
    print_traffic(args)


def print_traffic(args: dict) -> None:
    """Bytes and messages of one step (forward + backward), summed over ranks; the node columns count
    what crosses between the 2 'nodes' of the 4-process layout."""
    print(f"\ntraffic of one step (fwd+bwd), {args['t']} tokens per process, fp32 rows of {args['d']}, "
          f"summed over ranks; 4 processes = 2 nodes x {LOCAL}")
    print(f"{'config':<30}{'KiB sent':>10}{'messages':>10}{'KiB cross-node':>16}{'msgs cross-node':>17}")
    rows = [("2 processes, per assignment", 2, "per-assignment"), ("2 processes, dedupe", 2, "dedupe"),
            ("4 processes, per assignment", 4, "per-assignment"), ("4 processes, dedupe", 4, "dedupe"),
            ("4 processes, bi-level", 4, "bilevel"), ("4 processes, bi-level, SMILE", 4, "bilevel-smile")]
    for label, world, mode in rows:
        nbytes, msgs, node_bytes, node_msgs = run(world, mode, args)["traffic"]
        cross = (f"{node_bytes / 1024:>16.1f}{node_msgs:>17}" if world > LOCAL else f"{'-':>16}{'-':>17}")
        print(f"{label:<30}{nbytes / 1024:>10.1f}{msgs:>10}{cross}", flush=True)


if __name__ == "__main__":
    main()
