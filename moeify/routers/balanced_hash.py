"""Hash Layers' balanced assignment (Roller et al. 2021, "Hash Layers For Large Sparse Models", §3,
"Hashing functions", Balanced assignment): a lookup table id -> expert built once from the training
corpus's token frequencies, greedily giving the most frequent tokens to the emptiest expert, so every
expert sees about the same share of the corpus's *tokens* (not of the vocabulary). The paper's best hash.

Use: set `hash_vocab_size` in the layers' `MoEConfig` (router "hash", or "random" whose inference rule
hashes), then `set_hash_table(model, balanced_hash_table(counts, num_experts))`. The table is an integer
buffer of each router's `TokenHash`, so it is saved and loaded with the model.
"""

from __future__ import annotations

import heapq

import torch
from torch import nn

from moeify.errors import ConfigError
from moeify.routers.hashing import TokenHash

Tensor = torch.Tensor


def balanced_hash_table(token_counts: Tensor, num_experts: int) -> Tensor:
    """token_counts [V] (occurrences of each id in the corpus) -> table [V] int64 of experts.

    Greedy by frequency: ids in decreasing count order (ties: lower id first) each go to the expert with
    the fewest tokens so far (ties: lower expert). The heaviest expert then exceeds the mean load by at
    most the count of one id (the classic greedy bound); among equally loaded experts the one with fewer ids
    goes first, so ids never seen (count 0) spread over the least-loaded experts.
    """
    counts = torch.as_tensor(token_counts)
    if counts.dim() != 1 or counts.numel() == 0 or not torch.isfinite(counts.double()).all():
        raise ConfigError(f"token_counts must be a non-empty 1-D tensor of finite counts, got shape "
                          f"{tuple(counts.shape)}")
    if (counts < 0).any():
        raise ConfigError("token_counts must be >= 0 (occurrences of each token id)")
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ConfigError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    order = sorted(range(counts.numel()), key=lambda i: (-float(counts[i]), i))  # most frequent first
    loads = [(0.0, 0, e) for e in range(num_experts)]  # (tokens so far, ids so far, expert): a min-heap
    table = torch.empty(counts.numel(), dtype=torch.int64)  # [V]
    values = counts.tolist()
    for token in order:
        load, ids, expert = heapq.heappop(loads)
        table[token] = expert
        heapq.heappush(loads, (load + values[token], ids + 1, expert))
    return table


def set_hash_table(model: nn.Module, table: Tensor) -> int:
    """Copy `table` [V] into every token hash of `model` (hash and random routers); returns how many.

    Each layer's config must have `hash_vocab_size = V`; the layer's own hash seed is kept for ids >= V.
    """
    table = torch.as_tensor(table)
    hashes = [m for m in model.modules() if isinstance(m, TokenHash)]
    if not hashes:
        raise ConfigError("the model has no hash-routed layer (router 'hash' or 'random'); nothing to set")
    for h in hashes:
        if h.table is None or h.table.shape != table.shape:
            size = None if h.table is None else h.table.shape[0]
            raise ConfigError(f"a hash table of {table.shape[0]} ids needs hash_vocab_size={table.shape[0]} "
                              f"in the layer config (it is {size}); convert with "
                              "layer={'hash_vocab_size': ...}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= h.num_experts):
            raise ConfigError(f"hash table entries must be experts in [0, {h.num_experts})")
    with torch.no_grad():
        for h in hashes:
            h.table.copy_(table.to(h.table.device))
    return len(hashes)
