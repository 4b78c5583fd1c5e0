"""Any elementwise activation between the projections is found: named ones as moeify's names, the rest as
"custom" with a module computing them exactly; metadata reads of the hidden values are not uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moeify
from moeify.activations import ACTIVATIONS, activation_fn, activation_grad
from moeify.passes import analyse
from moeify.passes.activation import activation_module
from moeify.passes.capture import capture
from moeify.passes.rules.near_miss import near_misses

D, H = 16, 48


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_matches_autograd(name):
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    x = x[(x.abs() > 1e-3) & ((x.abs() - 3).abs() > 1e-3) & ((x - 6).abs() > 1e-3)]  # away from kinks
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(activation_fn(name)(x).sum(), x)
    torch.testing.assert_close(activation_grad(name)(x.detach()), grad)


# --- the zoo of activations: (module computing act, expected name) -------------------------------------


def scaled_swish(x):  # a user's function, traced inline
    return x * torch.sigmoid(1.5 * x)


class LearnedSwish(nn.Module):  # a user's module with a learned parameter: traced through
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class FnAct(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class MLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, H), act, nn.Linear(H, D)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class GatedMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.gate, self.up = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.down = nn.Linear(H, D, bias=False)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class ReLUSquaredInline(nn.Module):  # Nemotron-style, written as code
    def forward(self, x):
        return F.relu(x) ** 2


CASES = {
    "relu2_pow": (lambda: MLP(ReLUSquaredInline()), "relu2"),
    "relu2_square": (lambda: MLP(FnAct(lambda x: torch.square(F.relu(x)))), "relu2"),
    "tanh": (lambda: MLP(nn.Tanh()), "tanh"),
    "mish": (lambda: MLP(nn.Mish()), "mish"),
    "leaky_default": (lambda: MLP(nn.LeakyReLU()), "leaky_relu"),
    "leaky_0.2": (lambda: MLP(nn.LeakyReLU(0.2)), "custom"),
    "prelu": (lambda: MLP(nn.PReLU()), "custom"),
    "user_function": (lambda: MLP(FnAct(scaled_swish)), "custom"),
    "user_module": (lambda: MLP(LearnedSwish()), "custom"),
    "gated_custom": (lambda: GatedMLP(LearnedSwish()), "custom"),
    "gated_relu2": (lambda: GatedMLP(ReLUSquaredInline()), "relu2"),
}


def _build(case):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(D), CASES[case][0]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # move PReLU's / the learned beta off their inits
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_found_with_its_name(case):
    (m,) = moeify.find_ffns(_build(case))
    assert (m.name, m.activation, m.d_ff) == ("1", CASES[case][1], H)


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_module_computes_the_dense_activation(case):
    model = _build(case)
    (site,) = analyse(model).sites
    act = activation_module(site)
    ffn = model[1]
    x = torch.randn(3, 5, D)
    h = model[0](x)
    with torch.no_grad():
        if isinstance(ffn, GatedMLP):
            mine = ffn.down(act(ffn.gate(h)) * ffn.up(h))
        else:
            mine = ffn.down(act(ffn.up(h)))
        assert torch.equal(mine, model(x))
        if site.match.activation != "custom":  # a named one: moeify's function is the same computation
            hidden = (ffn.gate if isinstance(ffn, GatedMLP) else ffn.up)(h)
            assert torch.equal(activation_fn(site.match.activation)(hidden), act(hidden))
    # the module is a copy: changing the model does not change it
    params = list(act.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert all(p.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("case", ["relu2_pow", "tanh", "gated_relu2", "leaky_default"])
def test_named_new_activations_convert_exactly(case):
    model = _build(case)
    x = torch.randn(2, 7, D)
    moe = moeify.convert(model, experts=4, k=2, init="copy")
    assert any(isinstance(m, moeify.MoELayer) for m in moe.modules())
    with torch.no_grad():
        torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-6)


class _ChannelPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, H), nn.PReLU(H), nn.Linear(H, D)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.down(torch.cumsum(F.relu(self.up(x)), dim=-1))


@pytest.mark.parametrize("module, words", [
    (_ChannelPReLU(), "PReLU is not elementwise: nn.PReLU with one weight per channel"),
    (_Cumsum(), "cumsum is not elementwise: it accumulates"),
])
def test_not_elementwise_says_why(module, words):
    model = nn.Sequential(nn.LayerNorm(D), module)
    assert moeify.find_ffns(model) == []
    assert any(words in r.reason for r in moeify.explain_ffns(model)), moeify.explain_ffns(model)


def test_affine_between_projections_is_not_an_ffn():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, H), nn.Linear(H, D)

        def forward(self, x):
            return self.b(self.a(x) * 0.5 + 1.0)

    model = nn.Sequential(nn.LayerNorm(D), Scaled())
    assert moeify.find_ffns(model) == [] and moeify.explain_ffns(model) == []


# --- diffusers-style FeedForward: its GELU reads the hidden tensor's device and dtype --------------------


class DiffusersGELU(nn.Module):
    """diffusers.models.activations.GELU (written here: diffusers is not installed)."""

    def __init__(self, dim_in, dim_out, approximate="none", bias=True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def gelu(self, gate):
        if gate.device.type != "mps":
            return F.gelu(gate, approximate=self.approximate)
        # mps: gelu is not implemented for float16
        return F.gelu(gate.to(dtype=torch.float32), approximate=self.approximate).to(dtype=gate.dtype)

    def forward(self, hidden_states):
        hidden_states = self.proj(hidden_states)
        return self.gelu(hidden_states)


class FeedForward(nn.Module):
    """diffusers.models.attention.FeedForward with activation_fn="gelu"."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([DiffusersGELU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, hidden_states):
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class DiTBlock(nn.Module):
    """Attention + adaLN-modulated FeedForward, the shape of a DiT block."""

    def __init__(self, dim=D):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ada = nn.Linear(dim, 2 * dim)
        self.ff = FeedForward(dim)

    def forward(self, x, c):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        return x + self.ff(self.norm2(x) * (1 + scale) + shift)


class TinyDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([DiTBlock(), DiTBlock()])

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x


def test_diffusers_feedforward_found_and_converted_exactly():
    torch.manual_seed(0)
    model = TinyDiT().eval()
    found = moeify.find_ffns(model)
    assert [(m.name, m.activation, m.d_ff, m.rewrite) for m in found] == [
        (f"blocks.{i}.ff", "gelu", 4 * D, "module") for i in range(2)
    ]
    captured = capture(model)
    assert any(c.decided and "device" in c.decided[0] for c in captured.graphs)  # the branch was decided
    x, c = torch.randn(2, 5, D), torch.randn(2, D)
    moe = moeify.convert(model, experts=4, k=2, init="copy")
    assert sum(isinstance(m, moeify.MoELayer) for m in moe.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(moe(x, c), model(x, c), rtol=1e-5, atol=1e-6)


def test_hidden_metadata_read_is_not_a_use():
    class ReadsDtype(nn.Module):  # the activation casts back to the hidden values' own dtype
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

        def forward(self, x):
            h = self.up(x)
            return self.down(F.gelu(h.float()).to(h.dtype))

    model = nn.Sequential(nn.LayerNorm(D), ReadsDtype()).eval()
    (m,) = moeify.find_ffns(model)  # found: `h.dtype` is not a use of h (casts at the edges are skipped)
    assert m.activation == "gelu"
    (site,) = analyse(model).sites
    h = torch.randn(4, H)
    assert torch.equal(activation_module(site)(h), F.gelu(h.float()).to(h.dtype))


def test_hidden_shape_read_is_not_a_use():
    class ReadsShape(nn.Module):  # scales its output by the hidden width, read off the hidden values
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

        def forward(self, x):
            h = F.relu(self.up(x))
            return self.down(h) * (h.shape[-1] / H)

    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(D), ReadsShape()).eval()
    (m,) = moeify.find_ffns(model)
    assert m.rewrite == "forward"  # module: it computes more; chain: the up projection would change the shape
    x = torch.randn(2, 3, D)
    moe = moeify.convert(model, experts=4, k=2, init="copy")
    with torch.no_grad():
        torch.testing.assert_close(moe(x), model(x), rtol=1e-5, atol=1e-6)


# --- near misses ---------------------------------------------------------------------------------


def test_near_miss_names_the_silent_rules():
    model = nn.Sequential(nn.LayerNorm(D), _Cumsum())
    lines = near_misses(capture(model))
    head = "rule 'gated' matched nothing (looked at 2 linear-like nodes)"
    assert any(line.startswith(head) for line in lines)
    assert not any("'plain'" in line for line in lines)  # plain found a candidate (rejected, with a reason)
    model = nn.Sequential(nn.Linear(D, H), nn.Linear(H, D))
    (plain,) = [line for line in near_misses(capture(model)) if "'plain'" in line]
    assert "closest" not in plain and "no projection reads an elementwise activation" in plain


def test_activation_module_from_model_and_match():
    model = _build("prelu")
    (match,) = moeify.find_ffns(model)
    act = moeify.passes.activation_module(model, match)
    assert isinstance(act, nn.PReLU) and act is not model[1].act
    assert torch.equal(act.weight, model[1].act.weight)
