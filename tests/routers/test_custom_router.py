"""A router written outside moeify, registered with `register_router`, works end to end: convert, a training
step, save/load, portable ONNX export with ONNX Runtime parity.

Shape legend: T tokens, D model width, E experts, K experts per token.

The router is registered by a fixture and unregistered after it, so no other test sees it (the export tests
count one layer per registered router).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moeify
from moeify.losses import load_balance_loss
from moeify.routers import GROUPED_FFN, ROUTERS, Router, register_router, router_class, unregister_router
from moeify.routing import SparseRouting
from moeify.upcycle import UpcycleConfig, preserves_config
from tests.zoo import ZOO, rel_err

pytest.importorskip("transformers")

NAME = "cosine_test"
E, K = 4, 2


class CosineRouter(Router):
    """Cosine routing (X-MoE, Chi et al. 2022): logits = cos(x, w_e) / tau, softmax, top-k, renormalised.

    Declares nothing beyond the base class's defaults (learned, token choice, K experts a token, lowered
    through moeify.GroupedFFN) and claims that exact copies stay exact (its weights sum to 1).
    """

    tau = 0.1

    @classmethod
    def preserves_dense(cls, upcycle, config) -> bool:
        return upcycle.copies_dense

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, D], weight [E, D] -> [T, E]
        return F.normalize(x.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t() / self.tau

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> SparseRouting:
        cfg = self.config
        T = x.shape[0]
        logits = self.compute_logits(x)  # [T, E]
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        top_w, top_idx = torch.topk(probs, cfg.k, dim=-1)  # [T, K]
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # [T, K]
        losses = {"load_balance": cfg.aux_loss_coef * load_balance_loss(probs, top_idx.reshape(-1),
                                                                        self.num_experts)}
        return SparseRouting(token_idx=torch.arange(T, device=x.device).repeat_interleave(cfg.k),
                             expert_idx=top_idx.reshape(-1), weight=top_w.reshape(-1), logits=logits,
                             losses=losses)


@pytest.fixture
def cosine_router():
    register_router(NAME)(CosineRouter)
    try:
        yield CosineRouter
    finally:
        unregister_router(NAME)


@pytest.fixture
def converted(cosine_router):
    entry = ZOO["llama"]
    dense = entry.build()
    moe = moeify.convert(dense, experts=E, k=K, router=NAME, init="copy", seed=0)
    return entry, dense, moe.eval()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, moeify.MoELayer)]


def test_registry_takes_it_and_gives_it_back():
    assert NAME not in ROUTERS
    with pytest.raises(moeify.ConfigError, match=f"unknown router '{NAME}'; valid: .*topk"):
        moeify.MoEConfig(d_model=8, d_ff=8, router=NAME)
    register_router(NAME)(CosineRouter)
    try:
        assert router_class(NAME) is CosineRouter
        assert moeify.MoEConfig(d_model=8, d_ff=8, router=NAME).router == NAME  # config validates lazily
        with pytest.raises(ValueError, match="already registered"):  # registering twice stays an error

            @register_router(NAME)
            class Other(Router):
                pass

    finally:
        assert unregister_router(NAME) is CosineRouter
    assert NAME not in ROUTERS
    with pytest.raises(KeyError, match=NAME):
        unregister_router(NAME)


def test_convert_uses_it_and_keeps_the_dense_function(converted):
    entry, dense, moe = converted
    layers = _layers(moe)
    assert len(layers) == len(entry.ffns) and all(type(m.router) is CosineRouter for m in layers)
    assert list(moeify.conversion_report(moe).converted) == list(entry.ffns)
    with torch.no_grad():
        assert rel_err(entry.run(moe), entry.run(dense)) <= 1e-5  # copies, weights summing to 1
    assert preserves_config(UpcycleConfig(init="copy"), layers[0].config)  # asked of the router class


def test_a_training_step_trains_the_router(converted):
    entry, _, moe = converted
    moe.train()
    router = _layers(moe)[0].router
    before = router.weight.detach().clone()
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    ids = entry.inputs()["input_ids"]
    out = moe(input_ids=ids, labels=ids)
    aux = moeify.aux_loss(moe)
    assert aux.requires_grad and float(aux.detach()) > 0  # one load-balance term per layer
    (out.loss + aux).backward()
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0
    opt.step()
    assert not torch.equal(router.weight.detach(), before)


def test_save_load_rebuilds_it(converted, tmp_path):
    entry, _, moe = converted
    moeify.save(moe, tmp_path / "moe")
    loaded = moeify.load(tmp_path / "moe")
    assert all(type(m.router) is CosineRouter for m in _layers(loaded))
    with torch.no_grad():
        assert torch.equal(entry.run(loaded), entry.run(moe))


@pytest.mark.ort
@pytest.mark.slow
def test_portable_export_matches_pytorch(converted, tmp_path):
    from moeify.runtime import make_session, run

    _, _, moe = converted
    assert CosineRouter.capabilities(_layers(moe)[0].config).lowerings == (GROUPED_FFN,)
    with torch.no_grad():  # trained a little so the routing is not the copies' trivial one
        for m in _layers(moe):
            m.router.weight.normal_(generator=torch.Generator().manual_seed(3))
            m.w1.add_(0.1 * torch.randn(m.w1.shape, generator=torch.Generator().manual_seed(4)))
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    result = moeify.export_onnx(moe, {"input_ids": ids}, tmp_path / "moe.onnx", target="portable")
    assert set(result.layers.values()) == {"moeify.GroupedFFN (inlined)"}
    session = make_session(result.path)
    for batch, seq in [(1, 3), (3, 11)]:
        ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = moe(input_ids=ids).logits.numpy()
        got = next(iter(run(session, {"input_ids": ids.numpy()}).values()))
        assert got.shape == want.shape
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-5, f"{batch}x{seq}: relative error {err:.2e}"
