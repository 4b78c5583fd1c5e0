"""`upcycle_layer_lazily` (experts one at a time, what streaming writes) gives exactly what
`upcycle_layer` fills, RNG draws included, for every strategy, with and without biases, in bfloat16 too."""

import pytest
import torch

from moeify.upcycle import DenseFFNWeights, UpcycleConfig, UpcycleError, upcycle_layer, upcycle_layer_lazily
from tests.upcycle.test_upcycle import make_dense, make_layer

CONFIGS = [
    UpcycleConfig(init="copy"),
    UpcycleConfig(init="noise", noise_std=0.1),
    UpcycleConfig(init="drop", drop_rate=0.5),
    UpcycleConfig(init="split"),
    UpcycleConfig(init="split", split_method="cluster"),
    UpcycleConfig(init="granular", granularity=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ucfg", CONFIGS, ids=lambda c: f"{c.init}-{c.split_method}")
def test_lazy_experts_equal_the_filled_layer(ucfg, bias, dtype):
    ffn = make_dense(bias=bias).to(dtype)
    dense = DenseFFNWeights.from_module(ffn)
    filled = make_layer(ucfg, ffn).to(dtype)
    result = upcycle_layer(filled, dense, ucfg, key="ffn")
    lazy = make_layer(ucfg, ffn).to(dtype)
    lazy_result, experts = upcycle_layer_lazily(lazy, dense, ucfg, key="ffn")
    count = 0
    for e, expert in enumerate(experts):
        for name in ("w1", "w2", "b1", "b2"):
            want, got = getattr(filled, name), getattr(expert, name)
            if want is None:
                continue
            got = torch.zeros_like(want[e]) if got is None else got.to(dtype)
            assert torch.equal(got, want[e]), (e, name)
        count += 1
    assert count == filled.w1.shape[0]
    assert torch.equal(lazy.router.weight, filled.router.weight)
    assert lazy_result.init == result.init
    for field in ("partition", "redrawn"):
        a, b = getattr(lazy_result, field), getattr(result, field)
        assert (a is None and b is None) or torch.equal(a, b), field


def test_a_router_init_reading_the_experts_is_not_lazy():
    ucfg = UpcycleConfig(init="split", router_init="avg_k")
    ffn = make_dense()
    with pytest.raises(UpcycleError, match="use upcycle_layer"):
        upcycle_layer_lazily(make_layer(ucfg, ffn), DenseFFNWeights.from_module(ffn), ucfg)
