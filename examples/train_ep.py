"""Train an upcycled MoE language model with expert parallelism.

    torchrun --nproc-per-node 2 examples/train_ep.py            # CPU: gloo; GPUs: NCCL, one per rank
    torchrun --nproc-per-node 2 examples/train_ep.py --quick    # a few seconds
    torchrun --nproc-per-node 4 examples/train_ep.py --mesh 2x2 --quick   # DP 2 x EP 2
    torchrun --nproc-per-node 4 examples/train_ep.py --mesh 2x2 --router smile --quick   # SMILE, 2 nodes x 2

A small dense decoder is trained for a few steps, its FFNs are upcycled into MoE layers (copy init: every
expert starts as the dense FFN, so the model computes the same function), then `moeify.parallelize`
shards the experts over the ranks (each rank keeps E/P of them) and wraps the rest in DDP. Each rank
trains on its own batches of a synthetic next-token task; the script prints the loss and, per rank, how
many token assignments each of its local experts processed (from every rank), then saves a DCP
checkpoint that any number of processes can load.

`--router smile` routes with SMILE's bi-level router (a node, then experts inside it; `router_groups` = the
mesh's node count A) over an A x B ('node', 'local') mesh with `bilevel=True`: each token crosses to one
node only. Its combine weights are not renormalised, so unlike top-k the upcycled copies do not reproduce
the dense model exactly at step 0.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import moeify
from moeify.parallel import clip_grad_norm_, save_checkpoint
from moeify.upcycle import DenseFFNWeights, UpcycleConfig, upcycle_layer

# Shape legend: B batch, S sequence, D model width, V vocabulary, E experts.


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn: nn.Module = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x):  # x [B, S, D]
        S = x.shape[1]
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool, device=x.device), diagonal=1)  # [S, S]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, d_ff: int, layers: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):  # tokens [B, S] -> logits [B, S, V]
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batch(gen: torch.Generator, batch_size: int, seq: int, vocab: int, device) -> torch.Tensor:
    """Sequences counting up from a random start modulo a random step: predictable from context."""
    start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
    step = torch.randint(1, 4, (batch_size, 1), generator=gen)
    return ((start + step * torch.arange(seq + 1)) % vocab).to(device)  # [B, S+1]


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])  # [B, S, V]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def upcycle(model: TinyLM, num_experts: int, k: int, router: str = "topk", router_groups: int = 1) -> None:
    """Replace every block's dense FFN by an MoE layer whose experts are copies of it."""
    for block in model.blocks:
        up, down = block.ffn[0], block.ffn[2]
        cfg = moeify.MoEConfig(d_model=up.in_features, d_ff=up.out_features, num_experts=num_experts, k=k,
                               activation="gelu", gated=False, bias=True, router=router,
                               router_groups=router_groups)
        # no capacity_factor: in a causal decoder a capacity limit would let a later token's choice drop an
        # earlier token's, so moeify refuses it there (MoELayer(causal=True) raises ConfigError)
        moe = moeify.MoELayer(cfg, causal=True).to(up.weight.device)
        dense = DenseFFNWeights(w1=up.weight, b1=up.bias, w2=down.weight, b2=down.bias, activation="gelu",
                                gated=False)
        upcycle_layer(moe, dense, UpcycleConfig(init="copy"))
        block.ffn = moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and a few steps")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--save", default=None, help="DCP checkpoint directory (default: a temporary one)")
    ap.add_argument("--mesh", default=None, metavar="AxB",
                    help="2-D mesh: A data-parallel replicas x B expert-parallel ranks (with --bilevel: "
                         "A nodes x B ranks per node); default: experts sharded over all ranks")
    ap.add_argument("--bilevel", action="store_true", help="with --mesh: node, then local exchange")
    ap.add_argument("--router", choices=("topk", "smile"), default="topk",
                    help="smile: SMILE's bi-level router (needs --mesh AxB; implies --bilevel, A nodes)")
    args = ap.parse_args()
    if args.router == "smile":
        if args.mesh is None:
            ap.error("--router smile needs --mesh AxB (A nodes x B ranks per node)")
        args.bilevel = True

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    vocab, seq, d, d_ff, layers = (32, 16, 32, 64, 2) if args.quick else (64, 64, 128, 512, 4)
    dense_steps, moe_steps = (5, args.steps or 8) if args.quick else (50, args.steps or 100)
    torch.manual_seed(0)  # same dense model on every rank
    model = TinyLM(vocab, d, heads=4, d_ff=d_ff, layers=layers, seq=seq).to(device)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data

    # 1. a little dense training (every rank the same: the dense model is the starting point)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dense_gen = torch.Generator().manual_seed(0)
    for _ in range(dense_steps):
        loss = lm_loss(model, batch(dense_gen, 16, seq, vocab, device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # 2. upcycle and shard the experts: rank r keeps experts [r*E/P, (r+1)*E/P)
    shape = None if args.mesh is None else tuple(int(n) for n in args.mesh.lower().split("x"))
    groups = shape[0] if args.router == "smile" else 1  # SMILE: one expert group per node
    upcycle(model, args.experts, k=2, router=args.router, router_groups=groups)
    ep_mesh = None
    if shape is not None:
        from torch.distributed.device_mesh import init_device_mesh

        names = ("node", "local") if args.bilevel else ("dp", "ep")
        ep_mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    model = moeify.parallelize(model, dp="ddp", ep_mesh=ep_mesh, bilevel=args.bilevel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    moe_layers = [m for m in model.modules() if isinstance(m, moeify.MoELayer)]
    per_rank = args.experts // moe_layers[0].expert_parallel.world_size  # E/P
    if rank == 0:
        backend = "nccl" if cuda else "gloo"
        print(f"{world} ranks ({backend}, mesh {args.mesh or world}, router {args.router}), {layers} MoE "
              f"layers x {args.experts} experts ({per_rank} per rank), dense loss {loss.item():.3f}", flush=True)

    load = torch.zeros(len(moe_layers), per_rank, dtype=torch.long)  # [layers, E/P]
    for step in range(moe_steps):
        tokens = batch(gen, 16, seq, vocab, device)
        loss = lm_loss(model, tokens)
        total = loss + moeify.aux_loss(model)
        opt.zero_grad()
        total.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for i, m in enumerate(moe_layers):
            load[i] += m.expert_parallel.last_local_load
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % max(1, moe_steps // 5) == 0 or step == moe_steps - 1):
            print(f"step {step:4d}  loss {mean.item() / world:.3f}", flush=True)

    # per-rank expert load: rows each local expert computed, summed over steps
    first = moe_layers[0].expert_parallel.rank * per_rank
    lines = [f"rank {rank}: experts {first}..{first + per_rank - 1}"]
    for i, row in enumerate(load.tolist()):
        lines.append(f"  layer {i}: " + " ".join(f"e{first + j}={n}" for j, n in enumerate(row)))
    gathered = [None] * world
    dist.all_gather_object(gathered, "\n".join(lines))
    if rank == 0:
        print("per-rank expert load (assignments computed, all steps):")
        print("\n".join(gathered), flush=True)

    path = args.save
    if path is None:
        path = tempfile.mkdtemp(prefix="train_ep_") if rank == 0 else None
        holder = [path]
        dist.broadcast_object_list(holder)
        path = holder[0]
    save_checkpoint(model, path, optimizer=opt)
    if rank == 0:
        print(f"checkpoint: {path} (loads on any number of processes: moeify.parallel.load_checkpoint)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
