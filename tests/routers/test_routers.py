"""Each router's contract: shapes, weights, balance, capacity, determinism, losses.

Shape legend: T tokens, D model width, E experts, K experts per token, N assignments, S slots per expert.
"""

from __future__ import annotations

import math

import pytest
import torch

import moeify
from moeify.losses import load_balance_loss, router_z_loss
from moeify.routers import ROUTERS, build_router, register_router
from moeify.routers.balanced import balanced_assignment, sinkhorn
from moeify.routers.expert_choice import expert_choice_capacity
from moeify.routers.hashing import NUM_PERMUTATIONS
from moeify.routing import SoftRouting, SparseRouting

D, E, T = 8, 4, 12


def cfg(**kw) -> moeify.MoEConfig:
    base = dict(d_model=D, d_ff=16, num_experts=E, k=2)
    base.update(kw)
    return moeify.MoEConfig(**base)


def make(router: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_router(cfg(router=router, **kw))


def x_of(t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def check_sparse(r: SparseRouting, t: int, n: int, num_experts: int = E) -> None:
    assert isinstance(r, SparseRouting)
    assert r.token_idx.shape == r.expert_idx.shape == r.weight.shape == (n,)
    assert r.token_idx.dtype == r.expert_idx.dtype == torch.int64
    assert r.weight.is_floating_point()
    assert r.logits.shape == (t, num_experts) and r.logits.dtype == torch.float32
    if n:
        assert 0 <= int(r.token_idx.min()) and int(r.token_idx.max()) < t
        assert 0 <= int(r.expert_idx.min()) and int(r.expert_idx.max()) <= num_experts


def per_token_weight(r: SparseRouting, t: int) -> torch.Tensor:
    """[T] sum of the weights of each token's kept assignments."""
    kept = r.expert_idx < E
    return torch.zeros(t).index_add(0, r.token_idx[kept], r.weight[kept].float())


def experts_per_token(r: SparseRouting, t: int) -> torch.Tensor:
    """[T, K] experts of a token-choice routing (assignments are token-major)."""
    return r.expert_idx.reshape(t, -1)


# ------------------------------------------------------------------------------------------- registry


def test_all_routers_registered():
    assert set(ROUTERS) >= {"topk", "expert_choice", "hash", "soft", "random", "balanced"}
    for name, cls in ROUTERS.items():
        assert cls.name == name


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_router("topk")
        class Other(moeify.routers.Router):
            pass


def test_learned_flags():
    assert not make("hash").learned and not make("random").learned
    assert list(make("hash").parameters()) == [] and list(make("random").parameters()) == []
    for name in ("topk", "expert_choice", "soft", "balanced"):
        assert make(name).learned and make(name).weight.requires_grad


def test_mixes_tokens_flags():
    assert {n for n in ROUTERS if make(n).caps.mixes_tokens} == {"expert_choice", "soft", "balanced"}
    assert make("topk", capacity_factor=1.0).caps.mixes_tokens  # drop priority looks at later tokens


@pytest.mark.parametrize("name", ["topk", "expert_choice", "soft", "balanced"])
def test_router_math_is_float32_whatever_the_input(name):
    r = make(name).to(torch.bfloat16)
    out = r(x_of().to(torch.bfloat16))
    assert out.logits.dtype == torch.float32


# ------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_topk_shapes_and_weights(k, score_fn):
    r = make("topk", k=k, score_fn=score_fn)(x_of())
    check_sparse(r, T, T * k)
    assert torch.equal(r.token_idx, torch.arange(T).repeat_interleave(k))
    chosen = experts_per_token(r, T)
    assert all(len(set(row.tolist())) == k for row in chosen)  # distinct experts
    torch.testing.assert_close(per_token_weight(r, T), torch.ones(T))
    # the chosen experts are the k best by score
    scores = torch.softmax(r.logits, -1) if score_fn == "softmax" else torch.sigmoid(r.logits)
    best = torch.topk(scores, k, dim=-1).indices
    assert torch.equal(chosen.sort(-1).values, best.sort(-1).values)


def test_topk_unnormalised_is_switch():
    """normalize=False, k=1: weight = the router probability (Switch), so the task loss trains the router."""
    router = make("topk", k=1, normalize=False)
    r = router(x_of())
    probs = torch.softmax(r.logits, -1)
    torch.testing.assert_close(r.weight, probs.max(-1).values)
    r.weight.sum().backward()
    assert router.weight.grad.abs().sum() > 0


def test_topk_k1_normalised_weight_is_one():
    r = make("topk", k=1)(x_of())
    torch.testing.assert_close(r.weight, torch.ones(T))


def test_topk_capacity_drops_overflow():
    router = make("topk", k=2, capacity_factor=1.0)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1.0  # every token: first choice expert 0, second choice expert 1
        router.weight[1] = 0.5
    x = x_of().abs() + 0.1  # positive, so the logits keep that order
    r = router(x)
    cap = math.ceil(1.0 * T * 2 / E)  # 6
    assert torch.equal(r.tokens_per_expert(E), torch.tensor([cap, cap, 0, 0]))
    chosen = experts_per_token(r, T)
    assert torch.equal(chosen[:cap], torch.tensor([[0, 1]] * cap))  # earlier tokens first
    assert torch.all(chosen[cap:] == E)  # the rest of each queue is dropped
    assert float(r.dropped_fraction(E)) == pytest.approx(0.5)


def test_topk_capacity_priority_first_choices_before_second():
    """GShard priority: a later token's first choice beats an earlier token's second choice."""
    from moeify.routers.capacity import drop_over_capacity

    idx = torch.tensor([[1, 0], [0, 1]])  # token 0: second choice 0; token 1: first choice 0
    kept = drop_over_capacity(idx, num_experts=2, capacity=1)
    assert kept.tolist() == [[1, 2], [0, 2]]


def test_topk_load_balance_counts_choices_before_drops():
    """A collapsed router is charged the full penalty (E * coef) even when capacity drops its overflow."""
    router = make("topk", k=1, capacity_factor=1.0, aux_loss_coef=1.0, z_loss_coef=0.0, normalize=False)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 100.0
    r = router(x_of().abs() + 0.1)
    assert float(r.dropped_fraction(E)) > 0.5
    assert r.losses["load_balance"].item() == pytest.approx(E, rel=1e-4)


def test_topk_jitter_only_in_training():
    router = make("topk", jitter_noise=0.1)
    x = x_of()
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_topk_losses_carry_coefficients_and_gradient():
    router = make("topk", aux_loss_coef=0.5, z_loss_coef=0.25)
    r = router(x_of())
    probs = torch.softmax(r.logits, -1)
    lb = load_balance_loss(probs, r.expert_idx, E)
    torch.testing.assert_close(r.losses["load_balance"], 0.5 * lb)
    torch.testing.assert_close(r.losses["z_loss"], 0.25 * router_z_loss(r.logits))
    sum(r.losses.values()).backward()
    assert router.weight.grad.abs().sum() > 0
    none = make("topk", aux_loss_coef=0.0, z_loss_coef=0.0)(x_of())
    assert none.losses == {}


# ------------------------------------------------------------------------------------------- losses


def test_load_balance_uniform_is_one():
    probs = torch.full((8, E), 1.0 / E)
    idx = torch.arange(8) % E  # every expert chosen equally often
    assert float(load_balance_loss(probs, idx, E)) == pytest.approx(1.0)


def test_load_balance_collapse_is_num_experts():
    probs = torch.zeros(8, E)
    probs[:, 2] = 1.0
    idx = torch.full((8,), 2)
    assert float(load_balance_loss(probs, idx, E)) == pytest.approx(E)


def test_load_balance_matches_switch_formula():
    logits = torch.randn(10, E, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(logits, -1)
    idx = torch.tensor([0, 0, 1, 3, 3, 3, 2, 0, 1, 3])
    f = torch.tensor([3, 2, 1, 4]) / 10.0
    expected = E * (f * probs.mean(0)).sum()
    torch.testing.assert_close(load_balance_loss(probs, idx, E), expected)
    # dropped markers (index E) are not counted as any expert
    torch.testing.assert_close(load_balance_loss(probs, torch.cat([idx, torch.tensor([E])]), E), expected)
    assert float(load_balance_loss(torch.zeros(0, E), torch.zeros(0, dtype=torch.int64), E)) == 0.0


def test_z_loss_known_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected)
    assert float(router_z_loss(torch.zeros(0, 2))) == 0.0


# ------------------------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize(
    "cf, k, t, expected",
    [
        (None, 2, 12, 6),  # default 1.0: ceil(12 * 2 / 4)
        (1.0, 1, 12, 3),
        (0.5, 1, 10, 2),  # ceil(1.25)
        (2.0, 2, 12, 12),
        (4.0, 2, 12, 12),  # capped at T
        (1.0, 1, 1, 1),
        (1.0, 1, 0, 0),
    ],
)
def test_expert_choice_capacity_formula(cf, k, t, expected):
    assert expert_choice_capacity(t, k, E, cf) == expected


@pytest.mark.parametrize("cf", [None, 0.5, 2.0])
def test_expert_choice_contract(cf):
    router = make("expert_choice", capacity_factor=cf)
    r = router(x_of())
    C = expert_choice_capacity(T, 2, E, cf)
    check_sparse(r, T, E * C)
    assert torch.equal(r.tokens_per_expert(E), torch.full((E,), C))  # perfect balance
    assert float(r.dropped_fraction(E)) == 0.0
    scores = torch.softmax(r.logits, -1)  # softmax over experts
    for e in range(E):
        rows = r.expert_idx == e
        tokens = r.token_idx[rows]
        assert len(set(tokens.tolist())) == C  # distinct tokens
        assert set(tokens.tolist()) == set(torch.topk(scores[:, e], C).indices.tolist())  # its top-C
        torch.testing.assert_close(r.weight[rows], scores[tokens, e])  # weight = token-expert score
    assert "load_balance" not in r.losses and "z_loss" in r.losses


def test_expert_choice_token_may_get_zero_or_all_experts():
    router = make("expert_choice", capacity_factor=1.0, k=1)  # C = 3 of 12 tokens
    with torch.no_grad():
        router.weight.zero_()
    x = x_of()
    x[0] = 0.0
    with torch.no_grad():
        router.weight[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x[:, 0] = torch.linspace(-1, 1, T)
    r = router(x)
    per_token = torch.bincount(r.token_idx, minlength=T)
    assert int(per_token.min()) == 0 and int(per_token.max()) >= 2


# ------------------------------------------------------------------------------------------- hash


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hash_of_token_ids_is_balanced_and_distinct(k):
    router = make("hash", k=k)
    blocks = 7
    ids = torch.arange(E * blocks)
    r = router(x_of(len(ids)), token_ids=ids)
    check_sparse(r, len(ids), len(ids) * k)
    chosen = experts_per_token(r, len(ids))
    for j in range(k):  # every choice rank is exactly balanced over whole blocks
        assert torch.equal(torch.bincount(chosen[:, j], minlength=E), torch.full((E,), blocks))
    assert all(len(set(row.tolist())) == k for row in chosen)
    torch.testing.assert_close(r.weight, torch.full((len(ids) * k,), 1.0 / k))
    assert r.losses == {}
    # any id range: within one id per expert per choice
    ids = torch.arange(1000, 1000 + 4 * E + 3)
    first = experts_per_token(router(x_of(len(ids)), token_ids=ids), len(ids))[:, 0]
    counts = torch.bincount(first, minlength=E)
    assert int(counts.max() - counts.min()) <= 1


def test_hash_depends_only_on_the_id():
    router = make("hash", k=1)
    ids = torch.tensor([5, 17, 5, 3, 17])
    a = router(x_of(5, seed=1), token_ids=ids).expert_idx
    b = router(x_of(5, seed=2), token_ids=ids).expert_idx
    assert torch.equal(a, b) and a[0] == a[2] and a[1] == a[4]
    # not simply id mod E: some block uses a non-identity permutation
    many = router(x_of(E * NUM_PERMUTATIONS), token_ids=torch.arange(E * NUM_PERMUTATIONS)).expert_idx
    assert not torch.equal(many, torch.arange(E * NUM_PERMUTATIONS) % E)
    # negative / huge ids are still valid experts
    odd = router(x_of(3), token_ids=torch.tensor([-1, 2**40, 0])).expert_idx
    assert odd.min() >= 0 and odd.max() < E


def test_hash_of_hidden_state_is_deterministic_and_seeded():
    x = x_of(64)
    r1 = make("hash", seed=0)(x)
    r2 = make("hash", seed=123)(x)  # global seed does not matter: hash_seed does
    assert torch.equal(r1.expert_idx, r2.expert_idx)
    r3 = make("hash", hash_seed=7)(x)
    assert not torch.equal(r1.expert_idx, r3.expert_idx)
    assert torch.equal(make("hash")(2.5 * x).expert_idx, r1.expert_idx)  # a projection: scale-invariant
    check_sparse(r1, 64, 64 * 2)


def test_hash_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    router = build_router(cfg(router="hash"))
    router(x_of())
    assert torch.equal(before, torch.get_rng_state())


def test_hash_survives_save_load_and_dtype_casts():
    src = moeify.MoELayer(cfg(router="hash", hash_seed=3))
    dst = moeify.MoELayer(cfg(router="hash", hash_seed=99))
    dst.load_state_dict(src.state_dict())
    assert {"router.hash.perms", "router.hash.projection"} <= set(src.state_dict())
    x = x_of(40)
    assert torch.equal(src.router(x).expert_idx, dst.router(x).expert_idx)
    proj = src.router.hash.projection.clone()
    src.to(torch.float64)
    assert torch.equal(src.router.hash.projection, proj)  # integer buffers are not cast


def test_hash_rejects_misshapen_ids():
    with pytest.raises(ValueError, match="one id per token"):
        make("hash")(x_of(), token_ids=torch.arange(T + 1))


# ------------------------------------------------------------------------------------------- soft


@pytest.mark.parametrize("slots", [1, 3])
def test_soft_dispatch_and_combine_normalisation(slots):
    router = make("soft", slots_per_expert=slots)
    assert router.weight.shape == (E * slots, D)
    r = router(x_of())
    assert isinstance(r, SoftRouting)
    assert r.dispatch.shape == r.combine.shape == r.logits.shape == (T, E * slots)
    torch.testing.assert_close(r.dispatch.sum(0), torch.ones(E * slots))  # each slot: convex comb. of tokens
    torch.testing.assert_close(r.combine.sum(1), torch.ones(T))  # each token: convex comb. of slots
    torch.testing.assert_close(r.dispatch, torch.softmax(r.logits, 0))
    torch.testing.assert_close(r.combine, torch.softmax(r.logits, 1))
    torch.testing.assert_close(r.tokens_per_expert(E), torch.full((E,), float(slots)))
    assert float(r.dropped_fraction(E)) == 0.0


def test_soft_groups_the_whole_forward():
    """All tokens of one call form one group: a slot's input changes when another sequence changes."""
    router = make("soft")
    x = x_of(8)
    y = x.clone()
    y[7] += 1.0
    assert not torch.allclose(router(x).dispatch[0], router(y).dispatch[0])


# ------------------------------------------------------------------------------------------- random


@pytest.mark.parametrize("k", [1, 2, 4])
def test_random_training_draws_distinct_uniform_experts(k):
    router = make("random", k=k).train()
    torch.manual_seed(5)
    r = router(x_of(2000))
    check_sparse(r, 2000, 2000 * k)
    chosen = experts_per_token(r, 2000)
    assert all(len(set(row.tolist())) == k for row in chosen[:50])
    torch.testing.assert_close(r.weight, torch.full((2000 * k,), 1.0 / k))
    share = torch.bincount(r.expert_idx, minlength=E).float() / (2000 * k)
    assert torch.allclose(share, torch.full((E,), 1.0 / E), atol=0.03)
    assert r.losses == {}


def test_random_training_follows_the_torch_seed():
    router = make("random").train()
    x = x_of()
    torch.manual_seed(1)
    a = router(x).expert_idx
    torch.manual_seed(1)
    b = router(x).expert_idx
    c = router(x).expert_idx
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_random_eval_hash_is_deterministic_and_equals_the_hash_router():
    router = make("random", random_eval_rule="hash").eval()
    hash_router = make("hash")
    x, ids = x_of(), torch.arange(T) * 7
    a = router(x, token_ids=ids)
    b = router(x, token_ids=ids)
    assert torch.equal(a.expert_idx, b.expert_idx)
    assert torch.equal(a.expert_idx, hash_router(x, token_ids=ids).expert_idx)
    assert torch.equal(router(x).expert_idx, hash_router(x).expert_idx)
    before = torch.get_rng_state()
    router(x)
    assert torch.equal(before, torch.get_rng_state())  # inference draws nothing


def test_random_eval_mean_uses_every_expert_equally():
    r = make("random", random_eval_rule="mean").eval()(x_of())
    check_sparse(r, T, T * E)
    assert torch.equal(r.tokens_per_expert(E), torch.full((E,), T))
    torch.testing.assert_close(r.weight, torch.full((T * E,), 1.0 / E))
    torch.testing.assert_close(per_token_weight(r, T), torch.ones(T))


# ------------------------------------------------------------------------------------------- balanced


@pytest.mark.parametrize("t", [1, 3, 12, 13, 50])
def test_balanced_training_assignment_is_balanced(t):
    router = make("balanced").train()
    with torch.no_grad():
        router.weight.mul_(100.0)  # strong, unbalanced preferences
    r = router(x_of(t))
    check_sparse(r, t, t)
    assert torch.equal(r.token_idx, torch.arange(t))
    counts = r.tokens_per_expert(E)
    assert int(counts.sum()) == t
    assert set(counts.tolist()) <= {t // E, -(-t // E)}  # as equal as the count allows
    torch.testing.assert_close(r.weight, torch.sigmoid(r.logits.gather(1, r.expert_idx[:, None]).squeeze(1)))


def test_balanced_keeps_an_already_balanced_argmax():
    router = make("balanced").train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(E, D) * 10)
    x = torch.zeros(T, D)
    x[torch.arange(T), torch.arange(T) % E] = 1.0  # token t prefers expert t % E; 3 tokens each
    r = router(x)
    assert torch.equal(r.expert_idx, torch.arange(T) % E)


def test_balanced_inference_is_plain_top1():
    router = make("balanced").eval()
    with torch.no_grad():
        router.weight.mul_(100.0)
    r = router(x_of())
    assert torch.equal(r.expert_idx, r.logits.argmax(-1))
    r.weight.sum().backward()  # the sigmoid combine weight trains the router
    assert router.weight.grad.abs().sum() > 0


def test_balanced_assignment_respects_quotas():
    scores = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    scores[:, 0] += 10  # everybody wants expert 0
    quota = torch.tensor([4, 3, 3])
    expert = balanced_assignment(sinkhorn(scores, 4), quota)
    assert torch.equal(torch.bincount(expert, minlength=3), quota)


def test_sinkhorn_normalises():
    p = sinkhorn(torch.randn(12, 4), 50).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(12))
    torch.testing.assert_close(p.sum(0), torch.full((4,), 3.0), atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------- all routers


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_handles_one_and_zero_tokens(name):
    router = make(name)
    c = router.config
    # a router tied to its experts (Avg-K) is given them, as MoELayer does
    extra = {"expert_w1": torch.randn(E, c.expert_in_width, D)} if router.caps.reads_expert_weights else {}
    for t in (1, 0):
        r = router(x_of(t), **extra)
        if isinstance(r, SparseRouting):
            check_sparse(r, t, r.token_idx.numel())
            if t == 0:
                assert r.token_idx.numel() == 0
        for loss in r.losses.values():
            assert torch.isfinite(loss)
