"""examples/upcycle_gpt.py: its arms, verdict rule and corpus splits, and the --quick run end to end."""

import json
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import moeify

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import stdlib_corpus  # noqa: E402
import upcycle_arms  # noqa: E402
import upcycle_gpt  # noqa: E402
import upcycle_report  # noqa: E402
from tinygpt import GPT, GPTConfig, lm_loss  # noqa: E402

TINY = GPTConfig(context=16, n_layer=2, n_head=2, d_model=16, d_ff=32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARM_NAMES = ["dense", "top1-copy", "top1-drop", "top1-granular", "top2-copy", "top2-drop", "top2-granular"]


# --- building blocks ---------------------------------------------------------------------------------------

def test_arms_cover_top1_top2_and_every_init():
    assert [a.name for a in upcycle_arms.ARMS] == ARM_NAMES
    granular = upcycle_arms.arm_named("top2-granular")
    assert (granular.experts, granular.k) == (16, 4)  # 16 half-width experts, two whole MLPs' worth a token
    assert upcycle_arms.arm_named("top1-copy").router == "topk-st"
    with pytest.raises(KeyError, match="no arm named"):
        upcycle_arms.arm_named("top3-copy")


@pytest.mark.slow
def test_upcycled_arms_keep_the_function_except_drop_and_cost_what_they_say():
    torch.manual_seed(0)
    base = GPT(TINY).eval()
    x = torch.randint(0, 256, (2, TINY.context))  # [B, T]
    ref = base(x)  # [B, T, V]
    dense_params = upcycle_gpt.active_params_per_token(base)
    D, H, L = TINY.d_model, TINY.d_ff, TINY.n_layer
    for arm in upcycle_arms.ARMS[1:]:
        model = upcycle_arms.upcycle(base, arm, seed=0).eval()
        diff = (model(x) - ref).abs().max().item()
        assert (diff > 1e-3) if arm.init == "drop" else (diff < 1e-5), arm.name
        mlp = D * H + H + H * D + D
        # `width` MLPs' worth of weights, one output bias per active expert, and the router
        extra = L * ((arm.width - 1) * mlp + (arm.k - arm.width) * D + arm.experts * D)
        assert upcycle_gpt.active_params_per_token(model) == dense_params + extra, arm.name
    assert torch.equal(base(x), ref)  # upcycling left the dense model alone


@pytest.mark.slow
def test_straight_through_top1_trains_the_router_from_the_task_loss():
    """Renormalised top-1 weights are 1: plain topk gives the router no task gradient; topk-st does."""
    torch.manual_seed(0)
    base = GPT(TINY)
    x = torch.randint(0, 256, (2, TINY.context))  # [B, T]
    grads = {}
    for router in ("topk", "topk-st"):
        upcycle_arms.ensure_straight_through_router()
        model = moeify.convert(base, experts=4, k=1, router=router, init="copy", seed=0,
                               layer={"aux_loss_coef": 0.0, "z_loss_coef": 0.0})
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        grads[router] = sum(p.grad.abs().sum().item() for n, p in model.named_parameters() if "router" in n)
    assert grads["topk"] < 1e-6 and grads["topk-st"] > 1e-3  # topk: rounding only (p / p)


def test_verdict_rule_compares_the_gap_of_means_with_the_larger_range():
    S = upcycle_report.Spread
    dense = S((2.00, 2.01, 2.02))  # mean 2.01, range 0.02
    assert upcycle_report.compare(S((1.95, 1.96, 1.97)), dense)[0] == "BEATS"  # gap 0.05 > 0.02
    assert upcycle_report.compare(S((1.99, 2.00, 2.01)), dense)[0] == "within spread"  # gap 0.01
    assert upcycle_report.compare(S((1.90, 2.00, 2.10)), dense)[0] == "within spread"  # gap 0.01, range 0.2
    assert upcycle_report.compare(S((2.06, 2.07, 2.08)), dense)[0] == "BEHIND"
    assert str(dense) == "2.0100 (2.0000-2.0200)"


def test_held_out_files_split_into_disjoint_validation_and_test_halves():
    root = Path(sysconfig.get_paths()["stdlib"])
    held = [f.relative_to(root).as_posix() for f in stdlib_corpus.stdlib_files(root)
            if stdlib_corpus.is_held_out(f.relative_to(root).as_posix())]
    tests = [f for f in held if stdlib_corpus.is_test(f)]
    assert 0.25 < len(tests) / len(held) < 0.75
    corpus = stdlib_corpus.load_corpus(max_files=40)
    assert corpus.validation.numel() > 0 and corpus.test.numel() > 0
    assert corpus.held_out.numel() == corpus.validation.numel() + corpus.test.numel() + 2  # + one separator


def test_rejects_bad_budget(tmp_path):
    with pytest.raises(SystemExit, match="--budget must be a number > 0"):
        upcycle_gpt.main(["--quick", "--budget", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        upcycle_gpt.main(["--quick", "--seeds", "0", "--out", str(tmp_path)])


# --- the --quick run, end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("upcycle_quick")
    return out, upcycle_gpt.main(["--quick", "--out", str(out)])


@pytest.mark.slow
def test_quick_writes_table_verdict_and_plots_with_every_arm_and_seed(quick):
    out, results = quick
    report, verdict = (out / "report.md").read_text(), (out / "verdict.txt").read_text()
    assert report == results["report"] and "### Verdict" in report
    for name in ARM_NAMES:
        assert f"| {name} |" in report
        for seed in range(3):
            assert f"| {name} | {seed} |" in report  # the every-seed table
        assert name == "dense" or f"  {name} " in verdict
    assert "At equal extra FLOPs" in verdict and "At equal wall time" in verdict
    assert verdict.count("=> beat dense continuation at") == 2
    pngs = [Path(p) for p in results["pngs"]]
    assert [p.name for p in pngs] == ["loss_vs_extra_flops.png", "loss_vs_wall_time.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["arms"]) == ARM_NAMES
    assert all(sorted(arm["seeds"]) == ["0", "1", "2"] for arm in saved["arms"].values())


@pytest.mark.slow
def test_quick_arms_spend_the_budget_from_the_same_start(quick):
    _, results = quick
    budget, arms = results["budget"], results["arms"]
    assert budget["fractions"][-1] >= 0.5  # at least half the pretraining
    dense0 = arms["dense"]["seeds"][0]["test_loss"][0]
    for name, arm in arms.items():
        for seed, curve in arm["seeds"].items():
            assert all(math.isfinite(v) for v in curve["loss"] + curve["test_loss"])
            assert curve["flops"][-1] >= budget["flops"][-1]  # every arm trains to the largest budget
            assert curve["test_loss"][-1] < curve["test_loss"][0], (name, seed)
            if name == "dense" or not name.endswith("drop"):  # copy and granular start where dense stopped
                assert curve["test_loss"][0] == pytest.approx(dense0, abs=1e-4), (name, seed)
            else:
                assert curve["test_loss"][0] != pytest.approx(dense0, abs=1e-6), (name, seed)
    assert arms["dense"]["seeds"][0]["tokens"][-1] >= 0.5 * budget["pretrain_tokens"]
    top1, top2 = arms["top1-copy"]["flops_per_token"], arms["top2-copy"]["flops_per_token"]
    assert arms["dense"]["flops_per_token"] < top1 < 1.05 * arms["dense"]["flops_per_token"] < top2


@pytest.mark.slow
def test_resume_reuses_the_runs_and_refuses_other_settings(quick, capsys):
    out, results = quick
    again = upcycle_gpt.main(["--quick", "--out", str(out), "--resume"])
    assert "reusing" in capsys.readouterr().out
    for name, arm in results["arms"].items():
        for seed, curve in arm["seeds"].items():
            assert again["arms"][name]["seeds"][seed]["test_loss"] == curve["test_loss"]
    with pytest.raises(SystemExit, match="pretrained with other settings"):
        upcycle_gpt.main(["--quick", "--out", str(out), "--resume", "--pretrain-steps", "21"])
