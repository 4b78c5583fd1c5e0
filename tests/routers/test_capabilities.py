"""What each built-in router declares (`Router.capabilities`), as a table, and the declarations held to what
the routers do.

Shape legend: T tokens, D model width, E experts.
"""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.routers import GROUPED_FFN, ORT_MOE, ROUTERS, SOFT_EXPERTS, RouterCapabilities, router_class
from moeify.routing import SoftRouting

D, E, T = 8, 4, 24


def cfg(router: str, **kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{"d_model": D, "d_ff": 16, "num_experts": E, "k": 2, "router": router, **kw})


def caps(learned=True, ids=False, soft=False, mixes=False, active=2.0, lowerings=(GROUPED_FFN,), groups=1):
    return RouterCapabilities(learned=learned, reads_token_ids=ids, soft=soft, mixes_tokens=mixes,
                              active_experts=active, lowerings=lowerings, expert_groups=groups)


# (router, MoEConfig options, what it declares)
TABLE = [
    ("topk", {}, caps(lowerings=(ORT_MOE, GROUPED_FFN))),
    ("topk", {"k": 1, "score_fn": "sigmoid"}, caps(active=1.0, lowerings=(ORT_MOE, GROUPED_FFN))),
    ("topk", {"score_fn": "sigmoid", "normalize": False}, caps()),  # ORT's MoE has no raw sigmoid weights
    ("topk", {"capacity_factor": 1.0}, caps(mixes=True)),  # drops by priority over later tokens
    ("expert_choice", {}, caps(mixes=True)),
    ("expert_choice", {"k": 1, "capacity_factor": 2.5}, caps(mixes=True, active=2.5)),  # cf * k
    ("expert_choice", {"k": 4, "capacity_factor": 2.0}, caps(mixes=True, active=4.0)),  # at most E
    ("hash", {}, caps(learned=False, ids=True, lowerings=(ORT_MOE, GROUPED_FFN))),
    ("hash", {"k": 3}, caps(learned=False, ids=True, active=3.0, lowerings=(ORT_MOE, GROUPED_FFN))),
    ("random", {"k": 1}, caps(learned=False, ids=True, active=1.0, lowerings=(ORT_MOE, GROUPED_FFN))),
    ("random", {"random_eval_rule": "mean"},  # every expert, no ids: com.microsoft.MoE with k=E
     caps(learned=False, active=4.0, lowerings=(ORT_MOE, GROUPED_FFN))),
    ("soft", {}, caps(soft=True, mixes=True, active=4.0, lowerings=(SOFT_EXPERTS,))),
    ("soft", {"slots_per_expert": 2, "k": 1},
     caps(soft=True, mixes=True, active=4.0, lowerings=(SOFT_EXPERTS,))),
    ("balanced", {}, caps(mixes=True, active=1.0)),  # top-1 whatever k says
    ("balanced", {"k": 3}, caps(mixes=True, active=1.0)),
    ("smile", {"router_groups": 2}, caps(groups=2)),  # each token's experts inside one of 2 nodes
    ("smile", {"k": 1, "capacity_factor": 1.0}, caps(mixes=True, active=1.0)),  # one node: no groups
]


def _id(row):
    router, options, _ = row
    return "-".join([router, *(f"{k}={v}" for k, v in options.items())])


def test_table_covers_every_builtin_router():
    assert {router for router, _, _ in TABLE} == {"topk", "expert_choice", "hash", "random", "soft",
                                                  "balanced", "smile"}


@pytest.mark.parametrize("row", TABLE, ids=_id)
def test_declared_capabilities(row):
    router, options, want = row
    config = cfg(router, **options)
    assert router_class(router).capabilities(config) == want
    assert moeify.routers.build_router(config).caps == want  # an instance answers the same


@pytest.mark.parametrize("row", TABLE, ids=_id)
def test_declarations_hold(row):
    """learned <-> parameters; soft <-> a SoftRouting; active_experts <-> choices per token (eval, dropped
    ones counted); expert_groups > 1 -> a token's experts lie in one group;
    reads_token_ids <-> the route changes with the ids; not mixes_tokens <-> a token's route ignores the
    others."""
    router, options, want = row
    torch.manual_seed(0)
    r = moeify.routers.build_router(cfg(router, **options)).eval()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))  # [T, D]
    out = r(x)
    assert (len(list(r.parameters())) > 0) == want.learned
    assert isinstance(out, SoftRouting) == want.soft
    if want.soft:
        return
    assert out.expert_idx.numel() / T == pytest.approx(want.active_experts)
    if ORT_MOE in want.lowerings and not want.learned:  # the promise the fused export's log weights rely on
        w = out.dense_weights(T, E)  # [T, E]
        assert bool(((w > 0).sum(dim=1) == want.active_experts).all())
        assert torch.allclose(w.sum(dim=1), torch.ones(T))
    group = out.expert_idx // (E // want.expert_groups)  # [N] the group of each assignment
    groups_per_token = [len(set(group[out.token_idx == t].tolist())) for t in range(T)]
    assert (max(groups_per_token) == 1) >= (want.expert_groups > 1)  # grouped: one group a token
    ids = torch.arange(T)
    assert (not torch.equal(r(x, token_ids=ids).expert_idx, out.expert_idx)) == want.reads_token_ids
    if not want.mixes_tokens:  # the first 5 tokens route alike with or without the rest
        alone = r(x[:5])
        first = out.token_idx < 5
        assert torch.equal(alone.expert_idx, out.expert_idx[first])
        assert torch.equal(alone.weight, out.weight[first])


def test_every_router_class_answers():
    """Whatever is registered answers `capabilities` and `preserves_dense` (a custom router inherits them)."""
    ucfg = moeify.upcycle.UpcycleConfig(init="copy")
    for name, cls in ROUTERS.items():
        assert isinstance(cls.capabilities(cfg(name)), RouterCapabilities)
        assert isinstance(cls.preserves_dense(ucfg, cfg(name)), bool)


def test_router_class_names_the_valid_routers():
    with pytest.raises(moeify.ConfigError,
                       match="unknown router 'switch'; valid: avg_k, balanced, expert_choice"):
        router_class("switch")
    with pytest.raises(moeify.ConfigError, match="unknown router None"):
        router_class(None)
