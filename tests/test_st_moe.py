"""ST-MoE's recipe: expert dropout, a separate eval capacity factor, freezing parts of the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moeify
from moeify.routers import build_router

D, H, E, T = 8, 16, 4, 32


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=H, num_experts=E, k=1, activation="relu"), **kw})


def test_expert_dropout_is_dropout_on_the_hidden_activations_in_training_only():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(num_experts=1, expert_dropout=0.5))  # one expert: every token, weight 1
    x = torch.randn(T, D)
    torch.manual_seed(3)
    got = layer.train()(x)
    torch.manual_seed(3)
    hidden = nn.functional.dropout(torch.relu(x @ layer.w1[0].t() + layer.b1[0]), 0.5, training=True)
    torch.testing.assert_close(got, hidden @ layer.w2[0].t() + layer.b2[0])
    assert (hidden == 0).float().mean() > 0.3  # something was dropped
    plain = moeify.MoELayer(cfg(num_experts=1))
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.eval()(x), plain.eval()(x))  # eval: no dropout


def test_expert_dropout_trains_and_reaches_every_router_kind():
    torch.manual_seed(0)
    for router in ("topk", "soft"):
        layer = moeify.MoELayer(cfg(k=2, router=router, expert_dropout=0.3)).train()
        x = torch.randn(T, D)
        a, b = layer(x), layer(x)
        assert not torch.equal(a, b)  # fresh masks each forward
        (a.square().mean() + moeify.aux_loss(layer)).backward()
        assert layer.w1.grad is not None and layer.w1.grad.abs().sum() > 0


def test_eval_capacity_factor_applies_in_eval_mode_only():
    torch.manual_seed(0)
    router = build_router(cfg(router="topk", capacity_factor=0.5, eval_capacity_factor=4.0))
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1.0  # crowd expert 0: capacity decides how many get through
    x = torch.randn(T, D).abs()
    train_kept = (router.train()(x).expert_idx < E).sum().item()
    eval_kept = (router.eval()(x).expert_idx < E).sum().item()
    assert train_kept == 4  # ceil(0.5 * 32 * 1 / 4)
    assert eval_kept == T  # ceil(4.0 * 32 / 4) = 32: nothing dropped
    same = build_router(cfg(router="topk", capacity_factor=0.5)).eval()
    same.load_state_dict(router.state_dict())
    assert (same(x).expert_idx < E).sum().item() == 4  # default: the training factor in eval too


def test_eval_capacity_factor_for_expert_choice():
    router = build_router(cfg(router="expert_choice", capacity_factor=0.5, eval_capacity_factor=1.0))
    x = torch.randn(T, D)
    assert router.train()(x).expert_idx.numel() == E * 4  # C = ceil(0.5 * 32 / 4)
    assert router.eval()(x).expert_idx.numel() == E * 8


def test_config_errors():
    with pytest.raises(moeify.ConfigError, match="eval_capacity_factor"):
        cfg(eval_capacity_factor=2.0)  # no training capacity factor
    with pytest.raises(moeify.ConfigError, match="eval_capacity_factor"):
        cfg(capacity_factor=1.0, eval_capacity_factor=0)
    with pytest.raises(moeify.ConfigError, match="expert_dropout"):
        cfg(expert_dropout=1.0)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.moe1 = moeify.MoELayer(cfg(num_shared_experts=1))
        self.moe2 = moeify.MoELayer(cfg())
        moeify.share_router([self.moe1, self.moe2])
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        x = self.embed(x)
        return self.head(x + self.moe2(x + self.moe1(x)))


@pytest.mark.parametrize("part", ["experts", "routers", "non_experts"])
def test_freeze_each_part(part):
    torch.manual_seed(0)
    model = Model()
    names = {
        "routers": {"moe1.router.weight"},
        "experts": {f"moe{i}.{w}" for i in (1, 2) for w in ("w1", "b1", "w2", "b2")}
        | {n for n, _ in model.named_parameters() if n.startswith("moe1.shared.")},
        "non_experts": {n for n, _ in model.named_parameters() if n.startswith(("embed.", "head."))},
    }[part]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = moeify.freeze(model, part)
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == names
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(T, D)).square().mean() + moeify.aux_loss(model)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in names), n  # frozen stay, the rest train
    assert moeify.unfreeze(model, part) == frozen
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_errors():
    with pytest.raises(moeify.ConfigError, match="valid: experts, routers, non_experts"):
        moeify.freeze(Model(), "attention")
    with pytest.raises(moeify.ConfigError, match="no MoELayer"):
        moeify.freeze(nn.Linear(2, 2), "experts")
