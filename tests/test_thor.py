"""THOR: the consistency loss's formula, and training with it makes two random-route passes agree."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moeify
from moeify.losses import consistency_loss

D, C, V = 8, 5, 32


def test_consistency_loss_is_the_symmetric_kl():
    a, b = torch.randn(3, 4, C), torch.randn(3, 4, C)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    want = (0.5 * (kl(pa, pb) + kl(pb, pa))).mean()
    torch.testing.assert_close(consistency_loss(a, b), want)
    torch.testing.assert_close(consistency_loss(b, a), want)
    assert consistency_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="one shape"):
        consistency_loss(a, b[..., :2])


def test_thor_loss_is_the_papers_objective_on_a_hand_computed_case():
    """Two passes giving p1 = (1/2, 1/2) and p2 = (3/4, 1/4), label 0, per-token mean cross-entropy:
    CE(p1) = ln 2, CE(p2) = ln(4/3) and CR = 1/2 sum_c (p1_c - p2_c)(ln p1_c - ln p2_c)
    = 1/2 (1/4 ln(3/2) + 1/4 ln 2) = ln(3)/8, so the loss is ln 2 + ln(4/3) + alpha ln(3)/8: both task
    losses at full weight, as the released THOR code (`loss1 + loss2 + alpha * symmetric_KL_loss`)."""
    class TwoPasses(nn.Module):  # the first forward's logits, then the second's
        def __init__(self):
            super().__init__()
            self.passes = iter([torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])])

        def forward(self, batch):
            return next(self.passes)

    ce = lambda logits: nn.functional.cross_entropy(logits, torch.tensor([0]))  # noqa: E731
    step = moeify.thor_loss(TwoPasses(), torch.zeros(1), ce, alpha=2.0)
    assert step.task[0].item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert step.task[1].item() == pytest.approx(math.log(4.0 / 3.0), rel=1e-6)
    assert step.consistency.item() == pytest.approx(math.log(3.0) / 8, rel=1e-6)
    assert step.total.item() == pytest.approx(math.log(2.0) + math.log(4.0 / 3.0) + 2.0 * math.log(3.0) / 8,
                                              rel=1e-6)


def test_consistency_loss_averages_over_the_masked_positions():
    a, b = torch.randn(2, 5, C), torch.randn(2, 5, C)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    torch.testing.assert_close(consistency_loss(a, b, mask), consistency_loss(a[mask], b[mask]))
    with pytest.raises(ValueError, match="mask"):
        consistency_loss(a, b, mask[:, :2])


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.moe = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=16, num_experts=4, k=1, router="random"))
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.moe(x))


def train(alpha: float, steps: int = 40) -> tuple[Classifier, float]:
    """A classifier trained with THOR's objective; returns it and its pass-to-pass disagreement at init."""
    torch.manual_seed(0)
    model = Classifier().train()
    ids = torch.randint(0, V, (16, 6))
    labels = torch.randint(0, C, (16, 6))
    before = disagreement(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ce = lambda logits: nn.functional.cross_entropy(logits.reshape(-1, C), labels.reshape(-1))  # noqa: E731
    for _ in range(steps):
        step = moeify.thor_loss(model, ids, ce, alpha=alpha)
        opt.zero_grad()
        step.total.backward()
        opt.step()
    torch.testing.assert_close(step.total, step.task[0] + step.task[1] + alpha * step.consistency)
    return model, before


def disagreement(model: nn.Module) -> float:
    """Consistency loss between two random-route passes on fixed inputs (fixed RNG draws)."""
    inputs = torch.randint(0, V, (16, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.manual_seed(1)
        return consistency_loss(model(inputs), model(inputs)).item()


@pytest.mark.slow
def test_training_with_thor_reduces_disagreement_between_passes():
    thor, before = train(alpha=5.0)
    plain, _ = train(alpha=0.0)  # same data, same init, no consistency term
    assert disagreement(thor) < 0.5 * before
    assert disagreement(thor) < 0.5 * disagreement(plain)


def test_thor_loss_errors():
    model = Classifier()
    with pytest.raises(ValueError, match="alpha"):
        moeify.thor_loss(model, torch.zeros(1, 2, dtype=torch.long), lambda x: x.sum(), alpha=-1)
    with pytest.raises(TypeError, match="logits"):
        moeify.thor_loss(lambda ids: {"a": 1},
                         torch.zeros(1, 2, dtype=torch.long), lambda x: x.sum())
