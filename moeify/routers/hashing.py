"""The fixed, seeded hash shared by the `hash` router and the `random` router's inference rule.

Shape legend: T tokens, D model width, E experts, K experts per token, P permutation rows.

Two inputs can be hashed:
- token ids (the vocabulary index of each token, when the model hands them to the layer): ids are cut into
  blocks of E consecutive ids; block b uses the random permutation `perms[b % P]` of the E experts, and the
  j-th choice of id t is `perms[b % P][(t % E + j) % E]`. Within every block each expert is the j-th choice
  of exactly one id, so any id range is balanced to within one id per expert per choice, and a token's K
  experts are distinct.
- hidden states (when no ids reach the layer): a fixed random +-1 projection [D, E] of x; the token takes its
  top-K projected experts. This is a locality-sensitive hash: deterministic per input, but balanced only as
  far as the hidden states spread (a large shared direction in x concentrates it).

With `config.hash_vocab_size = V`, a lookup table [V] (a buffer, initially the permutation hash's first
choice) replaces the permutation hash for ids < V: choice j of id t is (table[t] + j) % E. Each shift is a
bijection of the experts, so a balanced table (`moeify.routers.balanced_hash_table`) stays balanced for
every choice, and the K experts stay distinct. Ids >= V keep the permutation hash.

All tables are integer buffers drawn from `config.hash_seed` with a private `torch.Generator` (the global
RNG is untouched). Integer buffers survive `model.to(dtype)` unchanged and travel in the state dict, so a
saved and reloaded model hashes exactly as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor

NUM_PERMUTATIONS = 128  # P: rows of random permutations; the id hash repeats with period P*E


class TokenHash(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        E, D = config.num_experts, config.d_model
        self.num_experts = E
        gen = torch.Generator().manual_seed(config.hash_seed)
        perms = torch.stack([torch.randperm(E, generator=gen) for _ in range(NUM_PERMUTATIONS)])  # [P, E]
        signs = torch.randint(0, 2, (D, E), generator=gen, dtype=torch.int8) * 2 - 1  # [D, E] in {-1, +1}
        self.register_buffer("perms", perms)
        self.register_buffer("projection", signs.to(torch.int8))
        table = None  # [V] id -> expert, only with config.hash_vocab_size
        if config.hash_vocab_size is not None:
            ids = torch.arange(config.hash_vocab_size)  # [V]
            table = perms[torch.remainder(ids.div(E, rounding_mode="floor"), NUM_PERMUTATIONS), ids % E]
        self.register_buffer("table", table)

    def from_ids(self, token_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """token_ids [T] (any integers) -> (experts [T, K] int64, one-hot scores [T, E] float32)."""
        E = self.num_experts
        ids = token_ids.to(torch.int64)  # [T]
        row = torch.remainder(ids.div(E, rounding_mode="floor"), self.perms.shape[0])  # [T]
        col = torch.remainder(ids.unsqueeze(1) + torch.arange(k, device=ids.device), E)  # [T, K]
        experts = self.perms[row.unsqueeze(1), col]  # [T, K]
        if self.table is not None:
            V = self.table.shape[0]
            base = self.table[ids.clamp(0, V - 1)]  # [T]
            tabled = torch.remainder(base.unsqueeze(1) + torch.arange(k, device=ids.device), E)  # [T, K]
            inside = ((ids >= 0) & (ids < V)).unsqueeze(1)  # [T, 1]
            experts = torch.where(inside, tabled, experts)  # [T, K]
        scores = torch.zeros(ids.shape[0], E, device=ids.device)  # [T, E]
        scores.scatter_(1, experts, 1.0)
        return experts, scores

    def from_hidden(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """x [T, D] -> (experts [T, K] int64, projection scores [T, E] float32)."""
        scores = x.float() @ self.projection.float()  # [T, E]
        return torch.topk(scores, k, dim=-1).indices, scores

    def forward(self, x: Tensor, token_ids: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        if token_ids is None:
            return self.from_hidden(x, k)
        if token_ids.shape != x.shape[:1]:
            raise ValueError(f"token_ids must have one id per token: got shape {tuple(token_ids.shape)} "
                             f"for {x.shape[0]} tokens")
        return self.from_ids(token_ids, k)
