"""Hash Layers' balanced hash: the greedy table's balance, the router using it, save and load."""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.io import load_model
from moeify.routers import balanced_hash_table, build_router, set_hash_table

D, E, V = 8, 4, 40


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=16, num_experts=E, k=1, router="hash"), **kw})


def zipf_counts(vocab: int = V) -> torch.Tensor:
    return (1000.0 / torch.arange(1, vocab + 1)).round().long()  # [V] a skewed corpus


def token_share(table: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.zeros(E).index_add(0, table, counts.float())  # [E] tokens each expert receives


def test_greedy_table_by_hand():
    # most frequent first, each to the emptiest expert: 10 -> e0, 5 -> e1, 3 -> e2, 1 -> e2, 1 -> e2 (4 < 5)
    table = balanced_hash_table(torch.tensor([10, 1, 1, 5, 3]), 3)
    assert table.tolist() == [0, 2, 2, 1, 2]


def test_balanced_table_balances_tokens_far_better_than_the_random_hash():
    counts = zipf_counts()
    table = balanced_hash_table(counts, E)
    share = token_share(table, counts)
    # greedy bound: the heaviest expert exceeds the mean by at most one id's count beyond the top E ids
    assert share.max() - share.mean() <= counts.max()
    assert share[1:].max() - share[1:].min() <= counts[E:].max()  # all but the top id's expert level out
    default = build_router(cfg(hash_vocab_size=V)).hash.table  # the permutation hash, no frequencies
    assert share.std() < token_share(default, counts).std()


def test_router_routes_by_the_table_for_every_choice():
    counts = zipf_counts()
    table = balanced_hash_table(counts, E)
    router = build_router(cfg(k=2, hash_vocab_size=V))
    assert set_hash_table(router, table) == 1
    ids = torch.arange(V + 5)  # ids >= V keep the permutation hash
    r = router(torch.randn(V + 5, D), token_ids=ids)
    experts = r.expert_idx.reshape(-1, 2)
    assert torch.equal(experts[:V, 0], table) and torch.equal(experts[:V, 1], (table + 1) % E)
    plain = build_router(cfg(k=2))(torch.randn(V + 5, D), token_ids=ids).expert_idx.reshape(-1, 2)
    assert torch.equal(experts[V:], plain[V:])


def test_default_table_keeps_the_permutation_hash_for_k1():
    ids = torch.arange(V)
    with_table = build_router(cfg(hash_vocab_size=V))(torch.randn(V, D), token_ids=ids).expert_idx
    without = build_router(cfg())(torch.randn(V, D), token_ids=ids).expert_idx
    assert torch.equal(with_table, without)


def test_table_is_saved_and_loaded(tmp_path):
    loaded = load_model("moeify.zoo:tiny_mlp")
    model = moeify.convert(loaded.model, experts=E, k=1, router="hash", layer={"hash_vocab_size": V},
                           inplace=True)
    table = balanced_hash_table(zipf_counts(), E)
    assert set_hash_table(model, table) >= 1
    again = moeify.load(moeify.save(model, tmp_path / "out", source=loaded.source))
    tables = [b for n, b in again.named_buffers() if n.endswith("hash.table")]
    assert tables and all(torch.equal(t, table) for t in tables)


def test_errors():
    with pytest.raises(moeify.ConfigError, match="hash_vocab_size"):
        cfg(hash_vocab_size=0)
    with pytest.raises(moeify.ConfigError, match="hash_vocab_size=3"):
        set_hash_table(build_router(cfg()), torch.tensor([0, 1, 2]))
    with pytest.raises(moeify.ConfigError, match=r"\[0, 4\)"):
        set_hash_table(build_router(cfg(hash_vocab_size=2)), torch.tensor([0, 4]))
    with pytest.raises(moeify.ConfigError, match=">= 0"):
        balanced_hash_table(torch.tensor([1, -1]), 2)
    with pytest.raises(moeify.ConfigError, match="no hash-routed layer"):
        set_hash_table(torch.nn.Linear(2, 2), torch.tensor([0]))
