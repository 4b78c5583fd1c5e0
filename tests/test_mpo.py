"""MPO experts (MPOE): the decomposition math (moeify/mpo.py), the experts module (moeify/mpo_experts.py),
the config fields, the parameter formula, training and the gradient mask."""

from __future__ import annotations

import math

import pytest
import torch

import moeify
from moeify.errors import ConfigError
from moeify.mpo import MPOShape, apply, contract, decompose, factorize, relative_error
from moeify.mpo_experts import GradMask, mpo_params
from moeify.report import count_params


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=12, d_ff=20, num_experts=4, k=2, expert_param="mpo"), **kw})


@pytest.mark.parametrize("n, parts", [(3072, 3), (768, 5), (7, 3), (1, 3), (96, 5)])
def test_factorize_product_and_largest_in_the_middle(n, parts):
    f = factorize(n, parts)
    assert len(f) == parts and math.prod(f) == n
    assert f[parts // 2] == max(f)


@pytest.mark.parametrize("rows, cols, cores", [(24, 10, 3), (20, 12, 5), (7, 16, 3), (40, 12, 3)])
def test_full_bond_is_exact_and_cores_have_their_shapes(rows, cols, cores):
    torch.manual_seed(0)
    w = torch.randn(rows, cols, dtype=torch.float64)  # [O, I]
    shape = MPOShape.for_matrix(rows, cols, cores)
    g = decompose(w, shape)
    assert [tuple(t.shape) for t in g] == [shape.core_shape(k) for k in range(cores)]
    assert relative_error(w, contract(g, shape)) < 1e-12


def test_truncation_error_is_the_reconstruction_error_and_shrinks_with_the_bond():
    torch.manual_seed(0)
    w = torch.randn(40, 24, dtype=torch.float64)
    errors = []
    for bond in (1, 2, 4, 8, None):
        shape = MPOShape.for_matrix(40, 24, 3, bond)
        approx = contract(decompose(w, shape), shape)
        errors.append(relative_error(w, approx))
        manual = float(torch.linalg.norm(w - approx) / torch.linalg.norm(w))
        assert errors[-1] == pytest.approx(manual)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.1 and errors[-1] < 1e-12


def test_auxiliary_tensors_are_isometries_so_the_central_one_holds_the_norm():
    # mixed canonical form: ||W||_F == ||G_c||_F
    torch.manual_seed(0)
    w = torch.randn(24, 20, dtype=torch.float64)
    shape = MPOShape.for_matrix(24, 20, 5)
    g = decompose(w, shape)
    assert float(torch.linalg.norm(g[shape.central])) == pytest.approx(float(torch.linalg.norm(w)))


def test_contracting_on_the_fly_equals_the_matrix_product():
    torch.manual_seed(0)
    w = torch.randn(24, 10, dtype=torch.float64)
    for cores in (3, 5):
        shape = MPOShape.for_matrix(24, 10, cores)
        x = torch.randn(7, 10, dtype=torch.float64)  # [T, I]
        torch.testing.assert_close(apply(x, decompose(w, shape), shape), x @ w.T)


def test_stacked_contraction_equals_each_expert_alone():
    torch.manual_seed(0)
    shape = MPOShape.for_matrix(12, 8, 3)
    central = torch.randn(shape.core_shape(1))
    left, right = torch.randn(3, *shape.core_shape(0)), torch.randn(3, *shape.core_shape(2))
    stacked = contract([left, central, right], shape)  # [E, O, I]
    for e in range(3):
        torch.testing.assert_close(stacked[e], contract([left[e], central, right[e]], shape))


@pytest.mark.parametrize("kw", [dict(), dict(mpo_bond=3), dict(mpo_cores=5, gated=True, activation="silu"),
                                dict(bias=False, num_experts=8)])
def test_parameter_count_equals_the_formula(kw):
    c = cfg(**kw)
    layer = moeify.MoELayer(c)
    E, D, H1 = c.num_experts, c.d_model, c.expert_in_width
    bias = E * (H1 + D) if c.bias else 0
    assert count_params(layer) == mpo_params(c) + bias + count_params(layer.router)
    # the formula spelled out: |G_c| + E * sum_{k != c} |G_k| per matrix
    expected = 0
    for rows, cols in ((H1, D), (D, c.d_ff)):
        s = MPOShape.for_matrix(rows, cols, c.mpo_cores, c.mpo_bond)
        sizes = [s.bonds[k] * s.out_factors[k] * s.in_factors[k] * s.bonds[k + 1] for k in range(s.cores)]
        expected += sizes[s.central] + E * (sum(sizes) - sizes[s.central])
    assert mpo_params(c) == expected


def test_experts_share_the_central_tensor():
    layer = moeify.MoELayer(cfg())
    w1, w2 = layer.expert_weights()
    assert w1.shape == (4, 20, 12) and w2.shape == (4, 12, 20)
    assert layer.mpo.w1.central.dim() == 4  # one, no expert dim
    assert all(p.shape[0] == 4 for p in layer.mpo.w1.aux)
    assert not torch.allclose(w1[0], w1[1])  # random init: experts differ through their auxiliaries


def test_random_init_has_the_dense_init_scale():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(d_model=64, d_ff=128, mpo_bond=16))
    with torch.no_grad():
        w1, w2 = layer.expert_weights()
    assert float(w1.std()) == pytest.approx(1 / math.sqrt(64), rel=0.3)
    assert float(w2.std()) == pytest.approx(1 / math.sqrt(128), rel=0.3)


def test_mpo_layer_matches_the_reference_dispatch_and_a_stacked_layer_with_its_weights():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(router="topk"))
    x = torch.randn(9, 12)
    fast = layer(x)
    layer.dispatch_impl = "reference"
    torch.testing.assert_close(layer(x), fast)
    dense = moeify.MoELayer(cfg(expert_param="dense"))
    w1, w2 = layer.expert_weights()
    dense.load_state_dict({**layer.state_dict(), "w1": w1.detach(), "w2": w2.detach()}, strict=False)
    torch.testing.assert_close(dense(x), fast)


def test_training_step_reaches_central_and_auxiliary_tensors():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg())
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer(torch.randn(16, 12)).square().mean().backward()
    opt.step()
    for name in ("mpo.w1.central", "mpo.w1.aux.0", "mpo.w1.aux.1", "mpo.w2.central", "mpo.w2.aux.1"):
        p = dict(layer.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), before[name]), name


def _central_grads(p_mask: float, seed: int = 0):
    torch.manual_seed(seed)
    layer = moeify.MoELayer(cfg(d_model=32, d_ff=64, mpo_grad_mask=p_mask))
    x = torch.randn(32, 32)
    torch.manual_seed(1)
    layer(x).square().mean().backward()
    return layer.mpo.w1.central.grad, layer.mpo.w1.aux[0].grad


def test_gradient_mask_drops_central_gradient_entries_and_leaves_the_auxiliaries():
    full, aux_full = _central_grads(0.0)
    masked, aux_masked = _central_grads(0.5)
    torch.testing.assert_close(aux_masked, aux_full)  # auxiliary tensors: untouched
    dropped = masked == 0
    torch.testing.assert_close(masked[~dropped], full[~dropped])  # kept entries unchanged (no rescaling)
    fraction = float(dropped.float().mean())
    assert 0.4 < fraction < 0.6, fraction  # thousands of entries, p = 0.5
    none, aux_none = _central_grads(1.0)
    assert torch.count_nonzero(none) == 0 and torch.count_nonzero(aux_none) > 0


def test_gradient_mask_is_off_in_eval_and_leaves_the_forward_alone():
    layer = moeify.MoELayer(cfg(mpo_grad_mask=0.5))
    x = torch.randn(5, 12)
    out_train = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), out_train)
    t = torch.randn(3, requires_grad=True)
    GradMask.apply(t, 0.0).sum().backward()
    assert torch.equal(t.grad, torch.ones(3))


@pytest.mark.parametrize("kw, words", [
    (dict(expert_param="tt"), "expert_param"),
    (dict(mpo_cores=4), "odd"),
    (dict(mpo_cores=1), "odd"),
    (dict(mpo_bond=0), "mpo_bond"),
    (dict(mpo_grad_mask=1.5), "mpo_grad_mask"),
    (dict(expert_param="dense", mpo_bond=4), 'expert_param="mpo"'),
])
def test_config_refuses_bad_mpo_settings(kw, words):
    with pytest.raises(ConfigError, match=words):
        cfg(**kw)


def test_config_json_round_trip_keeps_the_mpo_fields():
    c = cfg(mpo_bond=4, mpo_cores=5, mpo_grad_mask=0.2)
    assert moeify.MoEConfig.from_json(c.to_json()) == c


def test_mpo_layer_has_no_w1_and_says_what_to_read():
    layer = moeify.MoELayer(cfg())
    with pytest.raises(AttributeError, match="expert_weights"):
        layer.w1  # noqa: B018
    assert "w1" not in dict(layer.named_parameters())
