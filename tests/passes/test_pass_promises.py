"""Every pass keeps the promise it declares (optimum's Transformation test is the model).

Each zoo model goes through every pass in `moeify.passes.PASSES`, in convert's order, and each pass is
held to its declaration, whatever pass it is:

- `modifies_model=False`: parameters and buffers (the same tensors, the same values), the module tree
  (the same module objects under the same names), every module's training flag, instance attributes
  and hooks are identical before and after;
- `preserves_computation=True`: the model's eval-mode outputs are the same within 1e-5;
- otherwise nothing is asserted, but the pass must say so (copy + renormalised top-k claims it for
  rewrite, noise does not).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tests.zoo import ZOO, rel_err

from moeify.config import MoEConfig
from moeify.errors import MoeifyError
from moeify.layer import MoELayer
from moeify.passes import (
    PASSES,
    Analyse,
    Calibrate,
    Capture,
    ModuleSurgery,
    Pass,
    PassFailed,
    PassResult,
    PassRunner,
    Replacement,
    Rewrite,
    Select,
    WireTokenIds,
)
from moeify.passes.rewrite import dense_weights
from moeify.upcycle import UpcycleConfig, expert_d_ff, upcycle_layer

E = 4


def _snapshot(model: nn.Module) -> dict:
    """Everything an analysis pass must leave as it was."""
    tensors = model.state_dict(keep_vars=True)
    return {
        "tree": [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "training": [m.training for m in model.modules()],
        "attributes": [sorted(vars(m)) for m in model.modules()],
        "hooks": [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
        "tensors": {k: id(v) for k, v in tensors.items()},
        "values": {k: v.detach().clone() for k, v in tensors.items()},
    }


def _assert_same(before: dict, after: dict) -> None:
    for key in ("tree", "training", "attributes", "hooks", "tensors"):
        assert before[key] == after[key], key
    assert all(torch.equal(before["values"][k], after["values"][k]) for k in before["values"])


@torch.no_grad()
def _eval_outputs(model: nn.Module, entry) -> torch.Tensor:
    """The model's outputs in eval mode; every module's training flag is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return entry.run(model)
    finally:
        for m, training in modes:
            m.training = training


def _hold_to_promise(p: Pass, model: nn.Module, entry, runner: PassRunner):
    assert isinstance(p, Pass)
    assert isinstance(p.modifies_model, bool) and isinstance(p.preserves_computation, bool)
    before = _snapshot(model)
    out_before = _eval_outputs(model, entry) if p.preserves_computation else None
    result = runner.run(p, model)
    assert isinstance(result, PassResult) and result.summary and "\n" not in result.summary
    if not p.modifies_model:
        _assert_same(before, _snapshot(model))
    if p.preserves_computation:
        assert rel_err(_eval_outputs(model, entry), out_before) <= 1e-5
    return result


def _layers(model: nn.Module, sites, init: UpcycleConfig, calibration: dict) -> tuple[Replacement, ...]:
    """An upcycled MoELayer for every site (top-k, renormalised), as convert builds them."""
    out = []
    for site in sites:
        m = site.match
        cfg = MoEConfig(
            d_model=m.d_model,
            d_ff=expert_d_ff(init, m.d_ff, E),
            num_experts=E,
            k=2,
            router="topk",
            normalize=True,
            activation=m.activation,
            gated=m.gated,
            bias=m.bias,
        )
        torch.manual_seed(0)
        layer = MoELayer(cfg, causal=m.causal).train(site.cand.cap.module.training)
        upcycle_layer(layer, dense_weights(model, m), init, calibration=calibration.get(m.name), key=m.name)
        out.append(Replacement(site, layer))
    return tuple(out)


def _mixed_modes(model: nn.Module) -> nn.Module:
    """Eval mode with every third module in training mode: a pass that resets flags shows."""
    model.eval()
    for i, m in enumerate(model.modules()):
        m.training = i % 3 == 1
    return model


CASES = [(name, "copy") for name in ("sequential", "llama", "bert", "gpt2", "raw_linear", "torch_encoder")]
CASES += [("llama", "noise"), ("raw_linear", "noise")]


@pytest.mark.slow
@pytest.mark.parametrize("name, init", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_every_pass_keeps_its_promise(name, init):
    entry = ZOO[name]
    model = _mixed_modes(entry.build())
    runner = PassRunner()
    ran = []

    def hold(p):
        ran.append(type(p))
        return _hold_to_promise(p, model, entry, runner)

    captured = hold(Capture())
    analysis = hold(Analyse(captured))
    assert len(analysis.sites) == len(entry.ffns)
    sites = hold(Select(analysis.sites)).sites
    calibration = hold(Calibrate(sites, entry.inputs())).inputs
    assert set(calibration) == set(entry.ffns) and all(x.shape[0] > 0 for x in calibration.values())
    ucfg = UpcycleConfig(init=init)
    rewrite = Rewrite(_layers(model, sites, ucfg, calibration), ucfg)
    assert rewrite.preserves_computation is (init == "copy")  # noise does not claim it
    result = hold(rewrite)
    assert result.converted == tuple(entry.ffns) and sum(result.by_surgery.values()) == len(entry.ffns)
    assert sum(isinstance(m, MoELayer) for m in model.modules()) == len(entry.ffns)
    hold(WireTokenIds(tuple(r.layer for r in rewrite.replacements)))
    assert ran == list(PASSES)  # every pass was held to its promise, in convert's order
    assert runner.done == ("capture", "analyse", "select", "calibrate", "rewrite", "token_ids")


def test_rewrite_claims_nothing_without_an_init():
    entry = ZOO["sequential"]
    model = entry.build()
    sites = Analyse().run(model).sites
    assert Rewrite(_layers(model, sites, UpcycleConfig(init="copy"), {})).preserves_computation is False


def test_the_plan_is_chosen_once_and_typed():
    """Analyse stores the surgery on the site; rewrite executes that object as it stands."""
    model = ZOO["gpt2"].build()  # GPT2MLP ends in a dropout: the module surgery needs an adapter
    site = Analyse().run(model).sites[0]
    assert site.surgery == ModuleSurgery(x_index=0, x_name="hidden_states", trailing=("dropout",), bare=False)
    assert site.match.rewrite == site.surgery.name == "module"
    with pytest.raises(AttributeError):  # frozen: nobody re-decides after analyse
        site.surgery.bare = True


class _Broken:
    name, modifies_model, preserves_computation = "broken", False, True

    def __init__(self, exc: Exception):
        self.exc = exc

    def run(self, model):
        raise self.exc


def test_a_failing_pass_names_itself_and_what_ran_before():
    model = ZOO["sequential"].build()
    runner = PassRunner()
    runner.run(Analyse(runner.run(Capture(), model)), model)
    with pytest.raises(
        PassFailed, match=r"moeify pass 'broken' failed \(ran before it: capture, analyse\): boom"
    ):
        runner.run(_Broken(ValueError("boom")), model)
    with pytest.raises(MoeifyError, match="^yours$"):  # the user's errors go through as they are
        runner.run(_Broken(MoeifyError("yours")), model)
    assert runner.done == ("capture", "analyse")
